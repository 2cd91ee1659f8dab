"""The base install, for resource servers and apps' backends: the verifier and the SDK with
only PyJWT, cryptography and httpx; the Starlette integration with the ``starlette`` extra;
none of the server's dependencies (SQLAlchemy, Alembic, psycopg, redis, uvicorn, ...)."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVER_ONLY = ("sqlalchemy", "alembic", "psycopg", "redis", "uvicorn", "limits", "click", "orjson")

CLIENT_SIDE = """
import importlib.util, json
import leanauth
from leanauth import ClientCredentials, TokenVerifier
import leanauth.client, leanauth.verify
print(json.dumps({name: importlib.util.find_spec(name) is not None for name in NAMES}))
"""


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with ``pip install leanauth`` (no extras) from a copy of
    the project's sources (a build in the checkout would leave files in it)."""
    base = tmp_path_factory.mktemp("light")
    source = base / "source"
    shutil.copytree(
        ROOT / "src",
        source / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = base / "venv"
    venv.create(target, with_pip=True)
    installed = run(target / "bin" / "python", "-m", "pip", "install", "--quiet", source)
    assert installed.returncode == 0, installed.stderr
    return target


def test_the_verifier_and_the_sdk_import_without_the_server(light_venv: Path) -> None:
    script = f"NAMES = {(*SERVER_ONLY, 'jwt', 'httpx', 'cryptography')!r}\n{CLIENT_SIDE}"
    result = run(light_venv / "bin" / "python", "-c", script)
    assert result.returncode == 0, result.stderr
    present = json.loads(result.stdout)
    assert [name for name in SERVER_ONLY if present[name]] == []
    assert [name for name in ("jwt", "httpx", "cryptography") if not present[name]] == []


def test_the_command_names_the_extra_it_needs(light_venv: Path) -> None:
    result = run(light_venv / "bin" / "leanauth", "--help")
    assert result.returncode == 1
    assert "pip install 'leanauth[server]'" in result.stderr


def test_the_starlette_extra_brings_the_integration_and_nothing_more(light_venv: Path) -> None:
    # Installing only the extra's pin, as `pip install 'leanauth[starlette]'` would.
    extra = run(light_venv / "bin" / "python", "-m", "pip", "install", "--quiet", starlette_pin())
    assert extra.returncode == 0, extra.stderr
    script = (
        "import importlib.util\n"
        "from leanauth.resource import RequireToken, token_required\n"
        f"print([n for n in {SERVER_ONLY!r} if importlib.util.find_spec(n)])\n"
    )
    result = run(light_venv / "bin" / "python", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def starlette_pin() -> str:
    """The ``starlette`` extra's requirement, read from pyproject.toml."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = project["optional-dependencies"]["starlette"]
    assert isinstance(pin, str)
    return pin
