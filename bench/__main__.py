"""`python -m bench`: Backout's reproducible benchmarks.

Starts an embedded broker, real `backout worker` subprocesses and fake
services, measures tracking throughput, rollback throughput and latency,
worker memory and (optionally) a DBOS peer, each next to a raw baseline
measured in the same run, and prints the results as a table.

Examples:
    python -m bench                      # everything, 3 runs each (minutes)
    python -m bench --quick              # tiny smoke variant (seconds)
    python -m bench --only rollback --runs 5 --database postgres
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from bench.procs import postgres_available
from bench.report import SCENARIOS, markdown, print_report
from bench.scenarios import DEFAULT_CONCURRENCY, Bench, Sizes, run_all, summary
from consumers.memory import WORKER_GC_THRESHOLDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Backout benchmarks: tracking, rollback, memory, peer (DBOS).",
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke variant (seconds)")
    parser.add_argument("--runs", type=int, default=None, help="runs per measurement (3; quick 1)")
    parser.add_argument(
        "--only", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres", "both"),
        default=None,
        help="ledger database(s) for tracking and rollback (default: both; quick: sqlite)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda text: tuple(int(x) for x in text.split(",")),
        help="rollback sizes in events, comma-separated (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"BACKOUT_CONCURRENCY of the workers (default {DEFAULT_CONCURRENCY}; "
        "the worker's own default is 64)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--markdown", type=Path, help="also write the table as Markdown to this file"
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and databases here")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    sizes = Sizes.quick() if args.quick else Sizes.full()
    if args.sizes:
        sizes = dataclasses.replace(sizes, rollback=args.sizes)
    runs = args.runs or (1 if args.quick else 3)
    choice = args.database or ("sqlite" if args.quick else "both")
    databases = ["sqlite", "postgres"] if choice == "both" else [choice]
    if "postgres" in databases:
        problem = await postgres_available()
        if problem is not None:
            if choice == "postgres":
                print(f"PostgreSQL is not reachable on 127.0.0.1:5432: {problem}", file=sys.stderr)
                return 2
            print(f"PostgreSQL skipped (not reachable: {problem})", file=sys.stderr)
            databases = ["sqlite"]
    only = args.only or list(SCENARIOS)
    temporary = None
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = args.workdir
    else:
        temporary = tempfile.TemporaryDirectory(prefix="backout-bench-")
        workdir = Path(temporary.name)
    bench = Bench(
        sizes=sizes,
        runs=runs,
        databases=databases,
        workdir=workdir,
        concurrency=args.concurrency,
    )
    try:
        await run_all(bench, only)
    finally:
        title = (
            f"Backout benchmark ({'quick' if args.quick else 'full'}, "
            f"{'median of ' + str(runs) + ' runs [min-max]' if runs > 1 else '1 run'}, "
            f"BACKOUT_CONCURRENCY={args.concurrency})"
        )
        print_report(bench.rows, title, Console(width=240, soft_wrap=False))
        if args.markdown is not None:
            args.markdown.write_text(markdown(bench.rows) + "\n")
        if args.json is not None:
            args.json.write_text(
                json.dumps(
                    {
                        "quick": args.quick,
                        "runs": runs,
                        "databases": databases,
                        "rows": [
                            {**row.as_dict(), "summary": summary(row.values)} for row in bench.rows
                        ],
                    },
                    indent=2,
                    default=str,
                )
            )
        if temporary is not None:
            temporary.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    gc.set_threshold(*WORKER_GC_THRESHOLDS)
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
