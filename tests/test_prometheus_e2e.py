"""End to end: a real Prometheus (Debian's `prometheus` package; scripts/check-monitoring
installs it) scrapes a running Tally on loopback every second, with the rules of
monitoring/prometheus-rules.yaml loaded; the counters are read back through the query API,
and every query of the Grafana dashboard runs."""

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tally_client import TallyClient
from tally_client.errors import InsufficientCredits
from tests.conftest import ROOT, ServerProcess, free_port, start_server

PROMETHEUS = shutil.which("prometheus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="the prometheus binary is not installed (scripts/check-monitoring installs "
        "Debian's prometheus package)",
    ),
]

READY_SECONDS = 30
TARGET_UP_SECONDS = 30
QUERY_SECONDS = 30


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def _wait(what: str, seconds: float, check: Callable[[], bool], log: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what} within {seconds} s; log:\n{log()[-4000:]}")


class Prometheus:
    def __init__(self, base: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.base = base
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = _get_json(url)
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def eventually(self, expr: str, expected: float) -> None:
        """Waits until `expr` (one sample) equals `expected` (new scrapes arrive each second)."""
        seen: list[float | None] = []
        deadline = time.monotonic() + QUERY_SECONDS
        while time.monotonic() < deadline:
            seen.append(self.value(expr))
            if seen[-1] == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{expr} is {seen[-1]}, not {expected}")


@pytest.fixture(scope="module")
def tally(database_url: str, server_log_dir: Path) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    process = start_server(
        database_url, server_log_dir, extra_env={"TALLY_METRICS_ADDRESS": f"127.0.0.1:{port}"}
    )
    yield process, port
    process.stop()


@pytest.fixture(scope="module")
def prometheus(
    tally: tuple[ServerProcess, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    _, metrics_port = tally
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    # JSON is YAML.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ROOT / "monitoring" / "prometheus-rules.yaml")],
                "scrape_configs": [
                    {
                        "job_name": "tally",
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    try:

        def ready() -> bool:
            assert process.poll() is None, f"prometheus exited with {process.returncode}"
            with urllib.request.urlopen(f"{server.base}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)

        _wait("prometheus was not ready", READY_SECONDS, ready, server.log)

        def target_up() -> bool:
            targets = _get_json(f"{server.base}/api/v1/targets")["data"]["activeTargets"]
            return any(t["labels"]["job"] == "tally" and t["health"] == "up" for t in targets)

        _wait("the tally target was not up", TARGET_UP_SECONDS, target_up, server.log)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
def traffic(tally: tuple[ServerProcess, int]) -> str:
    """The RPCs of this module, once; returns the account id."""
    server, _ = tally
    account = f"acct-{uuid.uuid4().hex[:16]}"
    with TallyClient(server.target, timeout_seconds=10) as client:
        client.create_account(account)
        for _ in range(3):
            client.top_up(account, "10")
        hold = client.reserve(account, "5")
        client.capture(hold.reservation_id, "4")
        with pytest.raises(InsufficientCredits):
            client.debit(account, "1000")
    return account


def test_prometheus_scrapes_the_counters_of_real_traffic(
    prometheus: Prometheus, traffic: str
) -> None:
    account = traffic
    prometheus.eventually('up{job="tally"}', 1)
    prometheus.eventually(
        'sum(grpc_server_handled_total{job="tally", grpc_method="TopUp", grpc_code="OK"})', 3
    )
    prometheus.eventually(
        'sum(grpc_server_handled_total{job="tally", grpc_method="Debit",'
        ' grpc_code="FailedPrecondition"})',
        1,
    )
    prometheus.eventually('tally_ledger_entries_total{job="tally", type="credit"}', 3)
    prometheus.eventually('tally_ledger_entries_total{job="tally", type="debit"}', 1)
    prometheus.eventually('tally_holds_total{job="tally", outcome="captured"}', 1)
    prometheus.eventually('tally_insufficient_credit_rejections_total{job="tally"}', 1)
    prometheus.eventually('tally_db_up{job="tally"}', 1)
    # The recording rules run on the scraped series.
    prometheus.eventually('job:grpc_server_handled:rate5m{job="tally"} > bool 0', 1)
    prometheus.eventually('job:grpc_server_errors:ratio_rate5m{job="tally"}', 0)

    series = prometheus.query('{job="tally"}')
    assert len(series) > 50
    values = {value for s in series for value in s["metric"].values()}
    assert not any(account in value for value in values)
    # No alert fires for this healthy replica (TallyDown needs 5 minutes anyway).
    rules = _get_json(f"{prometheus.base}/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in rules} >= {"tally.recording", "tally.availability"}
    assert all(r.get("health") == "ok" for g in rules for r in g["rules"]), rules
    firing = _get_json(f"{prometheus.base}/api/v1/alerts")["data"]["alerts"]
    assert [a for a in firing if a["state"] == "firing"] == []


# Panels that the traffic above gives data.
_PANELS_WITH_DATA = {
    "Replicas up",
    "Database reachable",
    "RPC rate",
    "Server error ratio",
    "p99 unary latency",
    "Build",
    "RPC rate by method",
    "RPC rate by code",
    "p99 latency by method (unary)",
    "Holds by outcome",
    "Ledger entries by type",
    "Insufficient-credit rejections by method",
    "Connection pool",
    "Query time",
    "CPU",
    "Memory",
}


def test_every_dashboard_query_runs(prometheus: Prometheus, traffic: str) -> None:
    dashboard = json.loads((ROOT / "monitoring" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert {p["title"] for p in panels} >= _PANELS_WITH_DATA
    # A rate over a minute needs two scrapes in it: wait for the first panel to have data.
    deadline = time.monotonic() + QUERY_SECONDS
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            expr = re.sub(r"\$(job|instance)\b", ".+", expr)
            # No Kubernetes here: no namespace or pod label (the variables' "All" is .*).
            expr = re.sub(r"\$(namespace|pod)\b", ".*", expr)
            assert "$" not in expr, expr
            result = prometheus.query(expr)
            while not result and panel["title"] in _PANELS_WITH_DATA:
                assert time.monotonic() < deadline, f"{panel['title']}: no data for {expr}"
                time.sleep(0.5)
                result = prometheus.query(expr)
