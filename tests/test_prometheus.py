"""A real Prometheus server scrapes a running relay: the target is up, and what it stored
is what the relay counted. Prometheus comes from Debian's prometheus package, which
.ci/run installs; without it the test is skipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MakeRelay, relay_config, wait_for
from ports import reusable_port
from upstream import Upstream

BODY = b"Subject: scraped\r\nMessage-ID: <scraped@example.com>\r\n\r\nHello.\r\n"


class Prometheus:
    """`prometheus` scraping one target every second, its API on a loopback port."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = reusable_port()
        config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                  "scrape_configs": [{"job_name": "relay",
                                      "static_configs": [{"targets": [target]}]}]}
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("wb"))

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's result vector; empty until Prometheus answers."""
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expression}))
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                answer = json.load(response)
        except OSError:
            return []
        return answer["data"]["result"] if answer.get("status") == "success" else []

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        workdir = tmp_path / f"prometheus{len(started)}"
        workdir.mkdir()
        server = Prometheus(workdir, target)
        started.append(server)
        return server
    yield start
    for server in started:
        server.stop()


@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus (Debian package prometheus) missing")
def test_prometheus_scrapes_the_relay_and_stores_its_counts(
        make_relay: MakeRelay, upstream: Upstream, ca_file: Path, tmp_path: Path,
        prometheus_for: Any) -> None:
    """Two messages relayed, then Prometheus's own API: the relay's target is up, and it
    stored two received, two sent and none queued, the relay's figures."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, metrics={"port": 0}))
    for n in range(2):
        relay.send("app@example.com", [f"user{n}@example.com"], BODY)
    wait_for(lambda: len(upstream.messages()) == 2, what="two deliveries")
    prometheus = prometheus_for(f"127.0.0.1:{relay.metrics_port}")
    wait_for(lambda: prometheus.value('up{job="relay"}') == 1, timeout=60,
             what="Prometheus scraping the relay")
    upstream_name = f"127.0.0.1:{upstream.port}"
    wait_for(lambda: prometheus.value(
        f'relay_deliveries_total{{upstream="{upstream_name}",outcome="sent"}}') == 2,
        timeout=30, what="the deliveries in Prometheus")
    assert prometheus.value("relay_messages_received_total") == 2
    assert prometheus.value('relay_queue_messages{state="queued"}') == 0
