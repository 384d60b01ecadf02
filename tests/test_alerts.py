"""docs/relay-alerts.yml: every metric its rules name is one a real relay serves; promtool
loads the file and its unit tests (tests/alerts_test.yml) fire each alert when it should."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MakeRelay, relay_config, wait_for
from metrics_text import promtool
from prometheus_client.parser import text_string_to_metric_families
from upstream import Upstream

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "docs" / "relay-alerts.yml"
RULE_TESTS = Path(__file__).resolve().parent / "alerts_test.yml"
ALERTS = {"RelayBacklogGrowing", "RelayOldestMessageOverAnHour", "RelayUpstreamDown",
          "RelayUpstreamCredentialsRejected", "RelaySpoolDiskLow"}


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rule_file_has_the_five_alerts() -> None:
    """Backlog, oldest message, upstream down, credentials rejected, spool disk low."""
    assert {rule["alert"] for rule in rules()} == ALERTS
    assert all(rule["labels"]["severity"] in ("warning", "critical") for rule in rules())


def test_every_metric_in_the_rules_is_served(make_relay: MakeRelay, upstream: Upstream,
        ca_file: Path, tmp_path: Path) -> None:
    """Each relay_* name in an expression is a series a running relay exports."""
    relay = make_relay(relay_config(tmp_path, upstream, ca_file, metrics={"port": 0}))
    relay.send("app@example.com", ["user@example.com"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: "status=removed" in relay.log(), what="a delivery")
    status, text = relay.get("/metrics")
    assert status == 200
    served = set()
    for family in text_string_to_metric_families(text):
        served.add(family.name)
        served.update(sample.name for sample in family.samples)
    named = {name for rule in rules() for name in re.findall(r"\brelay_[a-z_]+", rule["expr"])}
    assert named, "no relay metric in the rules"
    assert named <= served, named - served


@pytest.mark.skipif(promtool() is None, reason="promtool (Debian package prometheus) missing")
def test_promtool_checks_the_rules() -> None:
    """`promtool check rules`: the file parses and every expression is valid PromQL."""
    result = subprocess.run([str(promtool()), "check", "rules", str(RULES)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@pytest.mark.skipif(promtool() is None, reason="promtool (Debian package prometheus) missing")
def test_each_alert_fires_on_its_series_and_not_before() -> None:
    """`promtool test rules` over tests/alerts_test.yml: each alert quiet, then firing."""
    result = subprocess.run([str(promtool()), "test", "rules", str(RULE_TESTS)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == ALERTS
