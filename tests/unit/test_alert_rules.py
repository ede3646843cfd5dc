"""deploy/prometheus/alerts.yml loads as it is: promtool accepts it (when installed) and its alerts fire
on the series they are meant for; every expression names only metrics `renova web` exports; every alert
has a severity, a summary, a description and a runbook that exists in the README."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parent.parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
README = ROOT / "README.md"
SEVERITIES = {"critical", "warning"}

# PromQL's keywords and the functions the rules may use; any other identifier must be a metric.
PROMQL_WORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "on",
        "ignoring",
        "by",
        "without",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "absent",
        "delta",
        "deriv",
        "increase",
        "rate",
        "max_over_time",
        "min_over_time",
        "time",
    }
)


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    found = [rule for group in document["groups"] for rule in group["rules"]]
    assert found, "no rules"
    return found


def metric_names(expression: str) -> set[str]:
    """The metric names in a PromQL expression: strings, label matchers, ranges and label lists removed."""
    bare = re.sub(r'"(?:\\.|[^"\\])*"', "", expression)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(on|ignoring|by|without|group_left|group_right)\s*\([^)]*\)", r"\1", bare)
    identifiers = re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", bare)
    return {identifier for identifier in identifiers if identifier not in PROMQL_WORDS}


def readme_anchors() -> set[str]:
    """GitHub's anchors of the README's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in README.read_text().splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: the `prometheus` package)")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_expressions_name_only_exported_metrics():
    exported = set(METRIC_NAMES)
    for rule in rules():
        names = metric_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in {rule['expr']!r}"
        assert names <= exported, f"{rule['alert']} names metrics /metrics does not export: {names - exported}"


def test_every_exported_metric_is_listed_in_the_readme():
    listed = set(re.findall(r"`(renova_[a-z_]+)`", README.read_text()))
    assert set(METRIC_NAMES) <= listed, f"not in README: {set(METRIC_NAMES) - listed}"


def test_the_metric_name_reader_sees_through_promql():
    expression = 'renova_a * on() group_left(run_date) renova_b{status="x y"} > 2 * 3600 and delta(renova_c[15m]) > 0'
    assert metric_names(expression) == {"renova_a", "renova_b", "renova_c"}
    assert metric_names("absent(other_metric)") == {"other_metric"}


def test_every_alert_has_severity_annotations_and_a_runbook_in_the_readme():
    anchors = readme_anchors()
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), rule["alert"]
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "README.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: README has no heading for #{anchor}"


WEB = {"job": "renova", "instance": "web:8000"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    matchers = ", ".join(f'{key}="{value}"' for key, value in {**WEB, **labels}.items())
    return {"series": f"{name}{{{matchers}}}", "values": values}


def firing(alert: str, at: str, labels: dict[str, str], summary: str, description: str) -> dict[str, Any]:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {
                "exp_labels": labels,
                "exp_annotations": {
                    "summary": summary,
                    "description": description,
                    "runbook": f"README.md#{alert.lower()}",
                },
            }
        ],
    }


def silent(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


def test_the_alerts_fire_on_the_series_they_are_meant_for(tmp_path: Path):
    """promtool's rule unit tests: an hour of series, and which alerts fire when, with what text."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: the `prometheus` package)")
    scenario = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # A change request waiting 6 minutes and more; billing work waiting 10 (under 30).
                    series("renova_queue_oldest_ready_age_seconds", "360+60x20", queue="changes"),
                    series("renova_queue_oldest_ready_age_seconds", "600x20", queue="billing"),
                    # The run of 2027-03-15 running for 2 hours.
                    series("renova_billing_run_age_seconds", "7200+60x20"),
                    series("renova_billing_run_info", "1x20", run_date="2027-03-15", status="running"),
                    # Two new dead letters on payments after 20 minutes; two notices failed after an hour.
                    series("renova_queue_dead_messages", "0x19 2x10", queue="payments"),
                    series("renova_notifications", "1x60 3x5", status="failed"),
                    series("renova_up", "0x70", component="redis"),
                    series("renova_up", "1x70", component="postgres"),
                    series("renova_workers_alive", "3x70"),
                    # Today's run 2 h 1 min late and not done; an unknown charge 31 minutes old.
                    series("renova_billing_today_run_late_seconds", "7260+60x20"),
                    series("renova_charges_unreconciled_oldest_age_seconds", "1860+60x20"),
                    # A chargeback reported after 30 minutes; no refund made outside Renova.
                    series("renova_charge_reversals_reported", "0x29 1x1500", kind="chargeback"),
                    series("renova_charge_reversals_reported", "2x1530", kind="refund"),
                ],
                "alert_rule_test": [
                    firing(
                        "RenovaChangesQueueLatency",
                        "5m",
                        {"severity": "critical", "queue": "changes", **WEB},
                        "Change requests wait more than 5 minutes for a worker",
                        "The oldest ready message on the `changes` queue has waited 11m 0s: customers' cycle "
                        "changes, method switches and cancellations are not being processed.",
                    ),
                    silent("RenovaBillingQueueLatency", "20m"),
                    firing(
                        "RenovaBillingRunStuck",
                        "6m",
                        {"severity": "warning", "run_date": "2027-03-15", **WEB},
                        "The billing run of 2027-03-15 has been running for over an hour",
                        "The billing run of 2027-03-15 started 2h 6m 0s ago and still finds work due at its "
                        "scans; later dates wait for it.",
                    ),
                    silent("RenovaDeadLettersGrowing", "19m"),
                    firing(
                        "RenovaDeadLettersGrowing",
                        "22m",
                        {"severity": "warning", "queue": "payments", **WEB},
                        "New dead letters on the payments queue",
                        "2 more message(s) failed for good on `payments` in the last 15 minutes (retries "
                        "exhausted, or an error that is not retried).",
                    ),
                    firing(
                        "RenovaNoticesFailing",
                        "62m",
                        {"severity": "warning", "status": "failed", **WEB},
                        "Notices are failing",
                        "2 notice(s) failed for good in the last hour (no recipient, or refused by the mail "
                        "server): the customers were not told.",
                    ),
                    firing(
                        "RenovaRedisDown",
                        "3m",
                        {"severity": "critical", "component": "redis", **WEB},
                        "renova web cannot read Redis",
                        "The metrics scrape of web:8000 could not read Renova's Redis (the broker).",
                    ),
                    silent("RenovaBillingRunLate", "4m"),
                    firing(
                        "RenovaBillingRunLate",
                        "6m",
                        {"severity": "critical", **WEB},
                        "Today's billing run is not done 2 hours after BILLING_RUN_AT",
                        "The billing run of the latest due business date became due 2h 7m 0s ago and is not done: "
                        "the day's renewals, boletos and dunning are waiting.",
                    ),
                    firing(
                        "RenovaUnknownChargesNotReconciled",
                        "3m",
                        {"severity": "critical", **WEB},
                        "Card charges with an unknown outcome for more than 30 minutes",
                        "The oldest charge attempt whose outcome is unknown (or pending past the reconcile window) "
                        "was recorded 34m 0s ago and the janitor has not resolved it: the customer may have been "
                        "charged.",
                    ),
                    silent("RenovaPaymentTakenBackAtPSP", "29m"),
                    firing(
                        "RenovaPaymentTakenBackAtPSP",
                        "30m",
                        {"severity": "warning", "kind": "chargeback", **WEB},
                        "A card payment was taken back at the PSP (chargeback)",
                        "1 card payment(s) taken back at the PSP in the last day (chargeback): Renova still "
                        "counts that money as received (renova audit list --action charge.reversed_at_gateway).",
                    ),
                    firing(
                        "RenovaPaymentTakenBackAtPSP",
                        "1460m",
                        {"severity": "warning", "kind": "chargeback", **WEB},
                        "A card payment was taken back at the PSP (chargeback)",
                        "1 card payment(s) taken back at the PSP in the last day (chargeback): Renova still "
                        "counts that money as received (renova audit list --action charge.reversed_at_gateway).",
                    ),
                    silent("RenovaPaymentTakenBackAtPSP", "1480m"),
                    silent("RenovaPostgresDown", "3m"),
                    silent("RenovaNoWorkerHeartbeat", "3m"),
                    silent("RenovaMetricsAbsent", "20m"),
                ],
            }
        ],
    }
    scenario_file = tmp_path / "alerts_test.yml"
    scenario_file.write_text(yaml.safe_dump(scenario, sort_keys=False))
    tested = subprocess.run([promtool, "test", "rules", str(scenario_file)], capture_output=True, text=True, timeout=60)
    assert tested.returncode == 0, tested.stdout + tested.stderr
