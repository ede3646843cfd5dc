"""The benchmark's verdicts and its Markdown lines (the pure part of bench/report.py; no timing here)."""

from datetime import datetime

import pytest

from bench.invariants import charged_twice
from bench.report import MET, NO_TARGET, NOT_MET, Result, Target, markdown_row, markdown_table, verdict


@pytest.mark.parametrize(
    ("target", "value", "ratio", "expected"),
    [
        (Target(">=", 400), 400.0, None, MET),
        (Target(">=", 400), 399.9, None, NOT_MET),
        (Target("<=", 250), 250.0, None, MET),
        (Target("<=", 250), 251.0, None, NOT_MET),
        (Target(">=", 0.5, on_ratio=True), 10.0, 0.5, MET),
        (Target(">=", 0.5, on_ratio=True), 99_999.0, 0.49, NOT_MET),
        (Target("<=", 1.5, on_ratio=True), 1.0, 1.6, NOT_MET),
        (Target(">=", 400), None, None, NOT_MET),
        (Target(">=", 0.5, on_ratio=True), 100.0, None, NOT_MET),
        (None, 1234.0, None, NO_TARGET),
    ],
)
def test_the_verdict_compares_the_value_or_the_ratio(target, value, ratio, expected):
    assert verdict(Result("x", value, "u", ratio=ratio, target=target)) == expected


def test_a_broken_invariant_is_not_met_whatever_the_speed():
    fast = Result("renewal day", 1e9, "renewals/s", ratio=100.0, target=Target(">=", 0.5, on_ratio=True))
    assert verdict(fast) == MET
    fast.violations.append("3 invoices charged twice")
    assert verdict(fast) == NOT_MET
    assert verdict(Result("floor", 3000.0, "messages/s", violations=["ledger check: balance ×1"])) == NOT_MET


def test_a_target_must_be_a_comparison():
    with pytest.raises(ValueError):
        Target(">", 1)


def test_the_markdown_row():
    result = Result("4. slow gateway", 412.345, "renewals/s", target=Target(">=", 400), note="a | b")
    assert markdown_row(result) == "| 4. slow gateway | 412 | renewals/s |  | ≥ 400 renewals/s | met | a \\| b |"
    ratio = Result("3. renewal day", 1520.0, "renewals/s", ratio=0.4567, target=Target(">=", 0.5, on_ratio=True))
    assert markdown_row(ratio) == "| 3. renewal day | 1,520 | renewals/s | 0.46 | ≥ 0.50 (ratio) | NOT MET |  |"
    broken = Result("6. memory", 3.5, "MB", target=Target("<=", 250), violations=["1 periods invoiced twice"])
    assert (
        markdown_row(broken)
        == "| 6. memory | 3.50 | MB |  | ≤ 250 MB | NOT MET | invariants broken: 1 periods invoiced twice |"
    )
    timed_out = Result("7. change requests", None, "s", target=Target("<=", 2), note="timed out")
    assert markdown_row(timed_out) == "| 7. change requests | — | s |  | ≤ 2.00 s | NOT MET | timed out |"


def test_the_markdown_table_names_the_date_commit_and_cores():
    table = markdown_table(
        [Result("1. floor", 3000.0, "messages/s")],
        when=datetime(2027, 5, 10, 9, 30),
        commit="abc1234",
        cores=2,
        mode="quick",
        setup="quick: sizes",
    )
    lines = table.splitlines()
    assert lines[0] == "## 2027-05-10 09:30 — quick, commit abc1234, 2 cores"
    assert lines[4] == "| scenario | measured | unit | ratio | target | verdict | note |"
    assert lines[5] == "|---|---|---|---|---|---|---|"
    assert lines[6] == "| 1. floor | 3,000 | messages/s |  |  | — |  |"


def test_a_charge_key_or_invoice_charged_twice_is_counted():
    entries = [{"idempotency_key": key} for key in ("charge:7:1", "charge:7:2", "charge:8:1", "charge:8:1", "bench:1")]
    assert charged_twice(entries) == ["1 idempotency keys charged twice", "2 invoices charged twice"]
    assert charged_twice([{"idempotency_key": "charge:9:1"}, {"idempotency_key": "bench:9"}]) == []
