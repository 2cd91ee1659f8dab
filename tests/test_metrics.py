"""Prometheus metrics: counts made in each worker, merged across the workers of one node.

Against a real server with two workers, every count is checked exactly: the test knows how
many tokens it was issued and how many requests it had refused, and waits (a second or
two: each worker writes its snapshot once a second) until /metrics says exactly that. The
merge itself is checked in process on snapshot files written here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    RELAXED_THROTTLE,
    AppCredentials,
    Env,
    Server,
    create_app,
    installation,
    request_token,
    start_server,
    wait_for,
)
from leanauth import metrics
from leanauth.app import LeanAuthApp
from leanauth.bootstrap import open_runtime
from leanauth.settings import Settings, SettingsError

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(server: Server) -> str:
    response = httpx.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def wait_for_value(server: Server, expected: float, name: str, **labels: str) -> None:
    """Wait until /metrics shows exactly ``expected`` (never more, on the way)."""

    def reached() -> bool:
        seen = value(parse(scrape(server)), name, **labels)
        assert seen <= expected, f"{name}{labels}: {seen} > {expected}"
        return seen == expected

    wait_for(reached, timeout=6, interval=0.2)


# A node of two workers, and what the tests did to it


class Node:
    def __init__(self, env: Env, server: Server, app: AppCredentials, customer_id: str) -> None:
        self.env, self.server, self.app, self.customer_id = env, server, app, customer_id
        # Tokens this module was issued, by scope class: what the counter must say.
        self.issued = {"api": 0, "customer": 0}
        self.tokens: list[str] = []

    def token(self, scope: str = "api", creds: AppCredentials | None = None) -> httpx.Response:
        response = request_token(self.server, creds or self.app, scope)
        if response.status_code == 200:
            self.issued[metrics.scope_class(scope)] += 1
            self.tokens.append(response.json()["access_token"])
        return response


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    data_dir = tmp_path_factory.mktemp("metrics")
    # No drain at the end: nothing balances traffic to this node.
    extra = {**RELAXED_THROTTLE, "LEANAUTH_DRAIN_SECONDS": "0"}
    env = installation(data_dir, f"sqlite:///{data_dir / 'leanauth.db'}", **extra)
    app = create_app(env, "--name", "Metrics app", "--scopes", "api,customer")
    customer = env.cli("customers", "create", "--app", app.client_id, "--app-user-id", "m-1")
    server = start_server(env, None, "--workers", "2")
    try:
        running = Node(env, server, app, customer["customer_id"])
        wait_for(lambda: running.token().status_code == 200)
        # Both workers see the app within a refresh interval (0.2 s) of each other.
        time.sleep(0.6)
        yield running
    finally:
        server.stop()


def test_both_workers_report(node: Node) -> None:
    wait_for_value(node.server, 2, "leanauth_metrics_processes")


def test_issued_tokens_are_counted_exactly_across_workers(node: Node) -> None:
    wait_for_value(
        node.server, node.issued["api"], "leanauth_tokens_issued_total", scope_class="api"
    )
    before = node.issued["api"]
    for _ in range(20):
        assert node.token("api").status_code == 200
    for _ in range(5):
        assert node.token(f"customer.{node.customer_id}").status_code == 200
    wait_for_value(node.server, before + 20, "leanauth_tokens_issued_total", scope_class="api")
    wait_for_value(
        node.server, node.issued["customer"], "leanauth_tokens_issued_total", scope_class="customer"
    )
    samples = parse(scrape(node.server))
    assert value(samples, "leanauth_customer_lookups_total", result="memory") >= 1


def test_refusals_are_counted_by_reason_and_scope_class(node: Node) -> None:
    wrong_secret = AppCredentials(node.app.client_id, "wrong-" + node.app.client_secret, {})
    # Scope classes no other request of this module used with these errors: exact counts.
    for _ in range(3):
        response = node.token(f"customer.{node.customer_id}", creds=wrong_secret)
        assert response.status_code == 401
    for _ in range(4):
        assert node.token("bogus-scope-text").status_code == 400
    unknown_customer = f"customer.{uuid.uuid4()}"
    assert node.token(unknown_customer).status_code == 400
    refusals = "leanauth_token_refusals_total"
    wait_for_value(node.server, 3, refusals, reason="invalid_client", scope_class="customer")
    wait_for_value(node.server, 4, refusals, reason="invalid_scope", scope_class="other")
    wait_for_value(node.server, 1, refusals, reason="invalid_scope", scope_class="customer")


def test_every_endpoint_has_a_latency_histogram(node: Node) -> None:
    url = node.server.url
    token = node.tokens[-1]
    form = {"client_id": node.app.client_id, "client_secret": node.app.client_secret}
    assert httpx.post(url + "/oauth2/introspect", data={**form, "token": token}).status_code == 200
    assert httpx.post(url + "/oauth2/revoke", data={**form, "token": token}).status_code == 200
    assert httpx.get(url + "/oauth2/jwks").status_code == 200
    assert httpx.get(url + "/.well-known/oauth-authorization-server").status_code == 200
    api = {"authorization": f"Bearer {node.tokens[0]}"}
    assert httpx.get(url + "/customers/v1/", headers=api).status_code == 200
    assert httpx.get(url + "/no-such-path").status_code == 404
    wait_for_value(node.server, 1, "leanauth_revocations_total", outcome="revoked")
    wait_for_value(node.server, 1, "leanauth_introspections_total", outcome="active")
    count = "leanauth_request_duration_seconds_count"
    endpoints = (
        "token",
        "revoke",
        "introspect",
        "jwks",
        "metadata",
        "customers",
        "health",
        "other",
    )

    def every_endpoint_counted() -> bool:
        samples = parse(scrape(node.server))
        return all(value(samples, count, endpoint=endpoint) >= 1 for endpoint in endpoints)

    # Each request went to either worker: each worker's snapshot comes within a second.
    wait_for(every_endpoint_counted, timeout=6, interval=0.2)
    samples = parse(scrape(node.server))
    assert value(samples, count, endpoint="token") >= sum(node.issued.values())
    token_buckets = value(
        samples, "leanauth_request_duration_seconds_bucket", endpoint="token", le="+Inf"
    )
    assert token_buckets == value(samples, count, endpoint="token")
    assert value(samples, "leanauth_request_duration_seconds_sum", endpoint="token") > 0


def test_gauges_describe_the_node(node: Node) -> None:
    samples = parse(scrape(node.server))
    assert value(samples, "leanauth_registry_apps") == 1
    assert value(samples, "leanauth_registry_customers") == 1
    assert 0 <= value(samples, "leanauth_registry_staleness_seconds") < 5
    assert value(samples, "leanauth_signing_key_age_seconds") > 0
    assert ("leanauth_audit_queue_records", frozenset()) in samples
    assert value(samples, "leanauth_audit_records_dropped_total") == 0
    assert value(samples, "leanauth_store_errors_total", operation="read") == 0


def test_no_identifier_or_secret_in_any_label(node: Node) -> None:
    text = scrape(node.server)
    secrets = [node.app.client_id, node.app.client_secret, node.customer_id, *node.tokens]
    for secret in [*secrets, "bogus-scope-text", "wrong-"]:
        assert secret not in text
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("leanauth_")
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if label == "le":
                    continue
                assert re.fullmatch(r"[a-z0-9_]{1,40}", label_value), (sample.name, label_value)


def _worker_pids(server: Server) -> list[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


def test_counts_of_a_killed_worker_are_kept(node: Node) -> None:
    """A worker that dies (and is replaced) leaves its last snapshot: no counter goes back."""
    for _ in range(6):
        assert node.token().status_code == 200
    total = node.issued["api"]
    wait_for_value(node.server, total, "leanauth_tokens_issued_total", scope_class="api")
    victim = _worker_pids(node.server)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in _worker_pids(node.server), timeout=5)
    # Whatever serves now (the other worker, then its replacement too), the count holds.
    issued = "leanauth_tokens_issued_total"
    assert value(parse(scrape(node.server)), issued, scope_class="api") == total
    # The replacement reports; the dead worker's gauges are gone, its counts are not.
    wait_for_value(node.server, 2, "leanauth_metrics_processes")
    assert victim not in _worker_pids(node.server)
    assert value(parse(scrape(node.server)), issued, scope_class="api") == total
    assert node.token().status_code == 200
    wait_for_value(node.server, total + 1, issued, scope_class="api")


# The merge, in process


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def _snapshot(pid: int, written_at: float, **parts: Any) -> dict[str, Any]:
    return {
        "pid": pid,
        "written_at": written_at,
        "counters": parts.get("counters", {}),
        "histograms": parts.get("histograms", {}),
        "gauges": parts.get("gauges", {}),
    }


def test_merge_sums_counters_and_keeps_a_dead_process_counts(tmp_path: Path) -> None:
    now = time.time()
    buckets = len(metrics.REQUEST_SECONDS.bounds) + 1
    live_series = [1] + [0] * (buckets - 1) + [0.00005]
    dead_series = [0, 2] + [0] * (buckets - 2) + [0.0004]
    issued = "leanauth_tokens_issued_total"
    live = _snapshot(
        os.getpid(),
        now,
        counters={issued: [[["api"], 3], [["customer"], 1]]},
        histograms={"leanauth_request_duration_seconds": [[["token"], live_series]]},
        gauges={"leanauth_audit_queue_records": 5, "leanauth_registry_apps": 7},
    )
    dead = _snapshot(
        _dead_pid(),
        now - 30,
        counters={issued: [[["api"], 4]], "leanauth_audit_records_dropped_total": [[[], 2]]},
        histograms={"leanauth_request_duration_seconds": [[["token"], dead_series]]},
        gauges={"leanauth_audit_queue_records": 100, "leanauth_registry_apps": 9},
    )
    metrics.save_snapshot(tmp_path, "1-1.json", live)
    metrics.save_snapshot(tmp_path, "2-1.json", dead)
    body, content_type = metrics.render(tmp_path)
    assert content_type.startswith("text/plain")
    samples = parse(body.decode())
    assert value(samples, issued, scope_class="api") == 7
    assert value(samples, issued, scope_class="customer") == 1
    assert value(samples, "leanauth_audit_records_dropped_total") == 2
    bucket = "leanauth_request_duration_seconds_bucket"
    assert value(samples, bucket, endpoint="token", le="0.0001") == 1
    assert value(samples, bucket, endpoint="token", le="0.00025") == 3
    assert value(samples, bucket, endpoint="token", le="+Inf") == 3
    assert value(samples, "leanauth_request_duration_seconds_count", endpoint="token") == 3
    assert value(
        samples, "leanauth_request_duration_seconds_sum", endpoint="token"
    ) == pytest.approx(0.00045)
    # Gauges: the live process's only.
    assert value(samples, "leanauth_audit_queue_records") == 5
    assert value(samples, "leanauth_registry_apps") == 7
    assert value(samples, "leanauth_metrics_processes") == 1


def test_gauges_merge_by_their_rule(tmp_path: Path) -> None:
    now = time.time()
    # Two live processes (this one and its parent), one gauge each way.
    for name, pid, queued, apps, synced in (
        ("a.json", os.getpid(), 2, 3, now - 4),
        ("b.json", os.getppid(), 5, 8, now - 1),
    ):
        gauges = {
            "leanauth_audit_queue_records": queued,
            "leanauth_registry_apps": apps,
            "leanauth_registry_staleness_seconds": synced,
        }
        metrics.save_snapshot(tmp_path, name, _snapshot(pid, now, gauges=gauges))
    # An old snapshot of a live pid: its gauges are out of date, left out.
    old = _snapshot(
        os.getpid(), now - 2 * metrics.GAUGE_MAX_AGE, gauges={"leanauth_registry_apps": 99}
    )
    metrics.save_snapshot(tmp_path, "c.json", old)
    samples = parse(metrics.render(tmp_path)[0].decode())
    assert value(samples, "leanauth_audit_queue_records") == 7  # sum
    assert value(samples, "leanauth_registry_apps") == 8  # max
    assert 4 <= value(samples, "leanauth_registry_staleness_seconds") < 6  # oldest, as an age
    assert value(samples, "leanauth_metrics_processes") == 2


def test_render_drops_unknown_metrics_foreign_labels_and_junk(tmp_path: Path) -> None:
    counters = {
        "leanauth_tokens_issued_total": [[["api"], 1], [["9f1c client-id"], 1], [["a", "b"], 1]],
        "leanauth_made_up_total": [[[], 1]],
    }
    metrics.save_snapshot(
        tmp_path, "1-1.json", _snapshot(os.getpid(), time.time(), counters=counters)
    )
    (tmp_path / "2-2.json").write_text("{not json")
    (tmp_path / "3-3.json").write_text('{"pid": 1}')
    (tmp_path / "notes.txt").write_text("ignored")
    text = metrics.render(tmp_path)[0].decode()
    assert "client-id" not in text
    assert "made_up" not in text
    samples = parse(text)
    assert value(samples, "leanauth_tokens_issued_total", scope_class="api") == 1
    assert metrics.render(tmp_path / "missing")[0].startswith(b"# HELP")


def test_writer_snapshots_this_process(tmp_path: Path) -> None:
    name = "leanauth_throttle_blocks_total"
    before = value(parse(metrics.render(tmp_path)[0].decode()), name, kind="scope")
    writer = metrics.SnapshotWriter(tmp_path, lambda: {metrics.AUDIT_QUEUED.name: 4})
    metrics.THROTTLE_BLOCKS.inc("scope")
    metrics.THROTTLE_BLOCKS.inc("scope")
    writer.write()
    samples = parse(writer.write_and_render()[0].decode())
    assert value(samples, name, kind="scope") == before + 2
    assert value(samples, "leanauth_audit_queue_records") == 4
    # One file, named by this process's pid (and its start: a pid can be reused).
    [written] = tmp_path.iterdir()
    assert written.name.startswith(f"{os.getpid()}-")


def test_labels_are_fixed_words() -> None:
    assert metrics.scope_class("api") == "api"
    assert metrics.scope_class("customer.0190a0a0-0000-7000-8000-000000000000") == "customer"
    assert metrics.scope_class("api customer.x") == "other"
    assert metrics.scope_class(None) == "other"
    assert metrics.endpoint_of("/oauth2/token") == "token"
    assert metrics.endpoint_of("/customers/v1/0190a0a0-0000-7000-8000-000000000000") == "customers"
    assert metrics.endpoint_of("/.well-known/oauth-authorization-server/tenant") == "metadata"
    assert metrics.endpoint_of("/wp-admin/" + "x" * 500) == "other"


def test_every_route_has_an_endpoint_label_and_the_port_setting(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.prepare()
    for port, served in (("0", True), ("9100", False)):
        settings = Settings.from_env({**env.vars, "LEANAUTH_METRICS_PORT": port})
        app = LeanAuthApp(open_runtime(settings, schema="none", actor="server"))
        try:
            paths = [getattr(route, "path", "") for route in app.starlette.routes]
            assert ("/metrics" in paths) is served
            for path in paths:
                assert metrics.endpoint_of(path) != "other", path
        finally:
            app.services.runtime.store.close()
    with pytest.raises(SettingsError, match="LEANAUTH_METRICS_PORT"):
        Settings.from_env({"LEANAUTH_PORT": "9100", "LEANAUTH_METRICS_PORT": "9100"})
    with pytest.raises(SettingsError, match="LEANAUTH_METRICS_PORT"):
        Settings.from_env({"LEANAUTH_METRICS_PORT": "70000"})


def test_dashboard_charts_exactly_the_metrics_served() -> None:
    import json

    dashboard = json.loads(
        (Path(__file__).parent.parent / "deploy/grafana-dashboard.json").read_text()
    )
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(re.findall(r"leanauth_[a-z_]+", " ".join(queries)))
    histogram = "leanauth_request_duration_seconds"
    used = {histogram if name.startswith(histogram + "_") else name for name in used}
    assert used == set(metrics.FAMILIES)
