"""Monitoring follows the fleet: nodes advertise reachable metrics URLs, the router serves them
as Prometheus HTTP service discovery, and a real Prometheus scrapes a box that joins after it
started and drops one whose heartbeat expired.

Needs the `prometheus` binary (Debian package `prometheus`; .ci/run installs it) for the
end-to-end test; `promtool` (same package) checks the generated and shipped configs.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from edgefleet.cli.side_services import SD_PATH, host_port, prometheus_config
from edgefleet.workers.advertise import advertised_metrics_url, route_address
from tests.conftest import Cluster, FakeInternet, free_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
READER_TOKEN = "reader-token"  # tests/conftest.py TOKENS: scope `read` only

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="the `prometheus` binary is not installed (apt-get install prometheus; .ci/run does)",
)
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian `prometheus`) missing")


def _local_addresses() -> set[str]:
    return {a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


# The unspecified ("any") addresses a node may bind its metrics to, spelled without a bind literal.
ANY_IPV4 = str(ipaddress.IPv4Address(0))
ANY_IPV6 = str(ipaddress.IPv6Address(0))

# --- the advertised address ------------------------------------------------------------


def test_a_configured_url_or_host_wins() -> None:
    broker = "redis://127.0.0.1:6379/0"
    assert advertised_metrics_url("http://minipc.lan:9100/metrics", ANY_IPV4, None, broker, 8701) == (
        "http://minipc.lan:9100/metrics"
    )
    assert advertised_metrics_url(None, ANY_IPV4, "minipc.lan", broker, 8701) == "http://minipc.lan:8701/metrics"
    assert advertised_metrics_url(None, ANY_IPV6, "fd00::5", broker, 8701) == "http://[fd00::5]:8701/metrics"


def test_a_node_bound_to_one_address_advertises_that_address() -> None:
    # One box, broker local, metrics on loopback only: 127.0.0.1 is the one address that answers.
    assert advertised_metrics_url(None, "127.0.0.1", None, "redis://127.0.0.1:6379/0", 8701) == (
        "http://127.0.0.1:8701/metrics"
    )


def test_a_wildcard_bind_never_advertises_the_wildcard() -> None:
    for bind in (ANY_IPV4, ANY_IPV6, ""):
        for broker in ("redis://127.0.0.1:6379/0", "unix:///run/redis.sock", "redis://no-such-host.invalid:6379"):
            url = advertised_metrics_url(None, bind, None, broker, 8701)
            host = httpx.URL(url).host
            assert host not in (ANY_IPV4, ANY_IPV6, "::", ""), (bind, broker, url)
            assert host in _local_addresses(), (bind, broker, url)


def test_the_route_to_a_remote_broker_names_the_interface_towards_it(fake_internet: FakeInternet | None) -> None:
    """A broker on another network host: the node advertises its own address on that link."""
    if fake_internet is None:
        pytest.skip("needs root and `ip` for a network namespace (the fake internet)")
    prefix = fake_internet.address.rsplit(".", 1)[0]
    # The fake internet is a /30 behind a veth: this box's end of the link is <prefix>.1.
    assert route_address(f"redis://:secret@{fake_internet.address}:6379/0") == f"{prefix}.1"
    assert advertised_metrics_url(None, ANY_IPV4, None, f"rediss://{fake_internet.address}:6380/0", 8701) == (
        f"http://{prefix}.1:8701/metrics"
    )


# --- the configs ---------------------------------------------------------------------------


@needs_promtool
def test_generated_and_shipped_configs_discover_nodes_through_the_router(tmp_path: Path) -> None:
    token_file = tmp_path / "router.token"
    token_file.write_text("t")
    generated = yaml.safe_load(
        prometheus_config(
            "127.0.0.1:8700",
            token_file,
            [],
            "127.0.0.1:5555",
            discovery_url=f"http://127.0.0.1:8700{SD_PATH}",
            discovery_refresh="2s",
        )
    )
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    for config in (generated, shipped):
        jobs = {j["job_name"]: j for j in config["scrape_configs"]}
        workers = jobs["edgefleet-workers"]
        assert "static_configs" not in workers  # nodes come from discovery only
        (sd,) = workers["http_sd_configs"]
        assert sd["url"].endswith(SD_PATH) and sd["authorization"]["credentials_file"]
        assert "authorization" not in workers  # the token goes to the router, never to the nodes
        # promtool reads the credentials file: point it at one that exists.
        sd["authorization"]["credentials_file"] = str(token_file)
        jobs["edgefleet-router"]["authorization"]["credentials_file"] = str(token_file)
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        # The shipped config loads its alert rules from beside itself.
        (tmp_path / "alerts.yml").write_text((ROOT / "deploy/prometheus/alerts.yml").read_text())
        checked = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


# --- end to end ------------------------------------------------------------------------------


def _sd(cluster: Cluster, token: str | None = READER_TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{cluster.url}{SD_PATH}", headers=headers, timeout=10)


def _node_targets(prom: str) -> dict[str, dict[str, Any]]:
    """Prometheus's active targets of the workers job, by node label."""
    try:
        active = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError):
        return {}
    return {t["labels"]["node"]: t for t in active if t["labels"].get("job") == "edgefleet-workers"}


@needs_prometheus
def test_prometheus_scrapes_a_node_that_joins_later_and_drops_one_that_left(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cluster = cluster_factory()
    cluster.start_router()
    cluster.start_node("sd-a", classes="cpu")
    cluster.wait_nodes_ready("sd-a")

    # The discovery document: read scope needed, one group per live node.
    assert _sd(cluster, token=None).status_code == 401
    answer = _sd(cluster)
    assert answer.status_code == 200, answer.text
    with cluster.client() as http:
        (node,) = http.get("/v1/workers").json()
    (group,) = answer.json()
    assert group["targets"] == [host_port(node["metrics_url"])]
    assert group["labels"]["node"] == "sd-a" and group["labels"]["__metrics_path__"] == "/metrics"

    prom_port = free_port()
    prom = f"http://127.0.0.1:{prom_port}"
    token_file = tmp_path / "reader.token"
    token_file.write_text(READER_TOKEN + "\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        prometheus_config(
            host_port(cluster.url),
            token_file,
            [],
            scrape_interval="1s",
            discovery_url=f"{cluster.url}{SD_PATH}",
            discovery_refresh="1s",
        )
    )
    with open(tmp_path / "prometheus.log", "ab") as prom_log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up(*names: str) -> dict[str, dict[str, Any]] | None:
            targets = _node_targets(prom)
            return targets if all(targets.get(n, {}).get("health") == "up" for n in names) else None

        def log() -> str:
            return (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]

        try:
            first = wait_until(lambda: up("sd-a"), 60, interval=0.5, what="Prometheus scraping sd-a")
        except AssertionError:
            raise AssertionError(f"targets: {_node_targets(prom)}\n{log()}") from None
        assert set(first) == {"sd-a"}

        # A box that joins after Prometheus started is scraped without touching its config.
        cluster.start_node("sd-b", classes="cpu")
        cluster.wait_nodes_ready("sd-b")
        both = wait_until(lambda: up("sd-a", "sd-b"), 60, interval=0.5, what="Prometheus scraping sd-b")
        assert both["sd-b"]["scrapeUrl"] == next(
            n["metrics_url"] for n in cluster.client().get("/v1/workers").json() if n["name"] == "sd-b"
        )

        # A box that dies (no goodbye): gone from discovery once its heartbeat expires, then from Prometheus.
        cluster.kill_node("sd-b")
        wait_until(
            lambda: "sd-b" not in _node_targets(prom) and _node_targets(prom),
            60,
            interval=0.5,
            what="Prometheus dropping sd-b",
        )
        assert [g["labels"]["node"] for g in _sd(cluster).json()] == ["sd-a"]
        assert _node_targets(prom)["sd-a"]["health"] == "up"
    finally:
        stop_process(proc, signal.SIGKILL)
