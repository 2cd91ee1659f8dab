"""README.md's Python snippets run as written, against a real server.

The blocks run in order in one namespace, as a reader follows them (a name imported in one
is used in the next). The values a reader brings (credentials, a token, a customer id) come
from a preamble, and the documented base URL ``http://127.0.0.1:8000`` becomes the test
server's. A block just after a ``<!-- not run -->`` line is only compiled: the README keeps
those few for what this environment cannot run (say why next to the marker's use).
"""

from __future__ import annotations

import asyncio
import re
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    create_app,
    new_token,
    serving,
    wait_until_known,
)

README = Path(__file__).resolve().parent.parent / "README.md"
DOCUMENTED_BASE = "http://127.0.0.1:8000"
NOT_RUN = "<!-- not run -->"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, for failure messages
    source: str
    run: bool


def python_blocks(text: str) -> list[Block]:
    """Every ```python block of ``text``; one right after the marker line is not run."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match.group(1), run=before.strip() != NOT_RUN))
    return blocks


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    return Env(tmp_path_factory.mktemp("readme"), dict(RELAXED_THROTTLE))


@pytest.fixture(scope="module")
def server(env: Env) -> Iterator[Server]:
    with serving(env) as running:
        yield running


@pytest.fixture(scope="module")
def preamble(env: Env, server: Server) -> dict[str, Any]:
    """The names README's snippets take as given, bound to a real app of the test server."""
    app = known(server, create_app(env, "--name", "README backend"))
    resource_server = known(server, create_app(env, "--name", "README RS", "--introspect"))
    customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "readme")
    return {
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "access_token": new_token(server, app),
        "customer_id": customer["customer_id"],
        "rs_client_id": resource_server.client_id,
        "rs_client_secret": resource_server.client_secret,
    }


def known(server: Server, creds: AppCredentials) -> AppCredentials:
    wait_until_known(server, creds)
    return creds


def run_blocks(blocks: list[Block], namespace: dict[str, Any], base_url: str) -> None:
    """Run (or only compile) each block in ``namespace``; fail naming the block's line."""
    for block in blocks:
        source = block.source.replace(DOCUMENTED_BASE, base_url)
        try:
            code = compile(source, f"README.md:{block.line}", "exec")
            if block.run:
                exec(code, namespace)  # the README's own snippets
        except Exception:
            pytest.fail(f"README.md block at line {block.line} failed:\n{traceback.format_exc()}")


def test_readme_python_blocks_run(server: Server, preamble: dict[str, Any]) -> None:
    blocks = python_blocks(README.read_text())
    namespace = dict(preamble)
    run_blocks(blocks, namespace, server.url)
    # What the snippets say they do: the introspecting verifier accepted the app's token,
    # and the Starlette endpoint accepts the customer token of the customer it names.
    assert namespace["token"].client_id == preamble["client_id"]
    assert_customer_endpoint(namespace, preamble["customer_id"])


def assert_customer_endpoint(namespace: dict[str, Any], customer_id: str) -> None:
    headers = {"Authorization": f"Bearer {namespace['link_token']}"}

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://rs") as client:
            return await client.get(path, headers=headers)

    mine = asyncio.run(get(f"/customers/{customer_id}/accounts"))
    assert mine.status_code == 200, mine.text
    assert mine.json() == {"customer_id": customer_id}
    other = asyncio.run(get(f"/customers/{uuid.uuid4()}/accounts"))
    assert other.status_code == 403


def test_every_python_block_is_found_and_few_are_not_run() -> None:
    """The extraction sees the README's blocks (a changed fence style would silently test
    nothing), and skipping stays the exception: FastAPI is not a dependency of the tests."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    skipped = [block for block in blocks if not block.run]
    assert len(skipped) == 1
    assert "from fastapi import" in skipped[0].source


def test_quick_start_says_how_to_run_the_command() -> None:
    quick_start = section(README.read_text(), "Quick start")
    assert ".venv/bin/leanauth" in quick_start
    assert "source .venv/bin/activate" in quick_start


def test_the_marker_skips_only_the_block_right_after_it() -> None:
    text = "\n".join(
        [
            NOT_RUN,
            "```python",
            "skipped()",
            "```",
            "",
            "```python",
            "ran()",
            "```",
            "",
        ]
    )
    assert [(b.source, b.run) for b in python_blocks(text)] == [
        ("skipped()\n", False),
        ("ran()\n", True),
    ]
