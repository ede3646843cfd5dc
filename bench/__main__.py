"""`make bench` / `make bench-quick`: the daily run's throughput, latency and memory against stated
targets, on a stack of the benchmark's own (embedded PostgreSQL, Redis and mail sink under
`.renova/bench`; the sandbox gateway, the Dramatiq workers and `renova web` as real processes).

    python -m bench [--quick] [--processes 2 --threads 8] [--only floor,day,...]

Prints one table (scenario, measured, unit, ratio, target, met / NOT MET) and appends it to
bench/RESULTS.md with the date, the commit and the core count. What each line means: the README's
"Benchmark" section."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bench.report import Result, append_results, cores, git_commit, markdown_table, print_table
from bench.stack import ROOT, BenchStack

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SCENARIOS = ("floor", "sandbox", "day", "slow", "changes", "scan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tenth of the sizes (a few minutes)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process (default 8)")
    parser.add_argument(
        "--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios among {', '.join(SCENARIOS)}"
    )
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    if unknown := set(only) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    stack = BenchStack(args.processes, args.threads).start()
    # Only now: the broker is built from the environment the stack just set, before any actor binds.
    import workers.broker  # noqa: F401
    from bench.scenarios import FULL, QUICK, SLOW_LATENCY_MS, Bench

    sizes = QUICK if args.quick else FULL
    bench = Bench(stack, sizes, say=lambda line: print(line, flush=True))
    results: list[Result] = []
    started = datetime.now()

    def run(name: str, measure: Callable[[], Result | list[Result]]) -> None:
        """A scenario that fails (a process that exits, an error) is a NOT MET line, not the end of the run."""
        if name not in only:
            return
        try:
            measured = measure()
        except Exception as exc:
            bench.say(f"  {name} failed: {exc!r}")
            measured = Result(f"{name}: failed", None, "", note=f"{exc.__class__.__name__}: {exc}"[:300])
            measured.violations.append("the scenario did not finish")
        results.extend(measured if isinstance(measured, list) else [measured])

    try:
        run("floor", bench.floor)
        run("sandbox", bench.sandbox_floor)
        run("day", lambda: [line for line in bench.renewal_day(latency_ms=0) if line is not None])
        run("slow", lambda: bench.renewal_day(latency_ms=SLOW_LATENCY_MS)[0])
        run("changes", bench.change_requests)
        run("scan", bench.scan_scaling)
    finally:
        stack.stop()
    results.sort(key=lambda result: result.scenario)

    mode = "quick" if args.quick else "full"
    setup = (
        f"{mode}: {sizes.subscriptions:,} subscriptions, {sizes.renewals:,} card renewals and {sizes.boletos:,} "
        f"T−7 boletos due; workers {args.processes} processes × {args.threads} threads; "
        f"took {(datetime.now() - started).total_seconds() / 60:.1f} min"
    )
    print_table(results, f"Renova benchmark — {setup}")
    append_results(
        RESULTS, markdown_table(results, when=started, commit=git_commit(ROOT), cores=cores(), mode=mode, setup=setup)
    )
    print(f"appended to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
