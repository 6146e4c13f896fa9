"""``ddfast bench ...``: the benchmark harness (:func:`ddfast.benchmarks.harness.main`; its options are
``ddfast bench --help``): every op × provider × mode, CSV / JSON rows and a markdown table, speed-ups as
ratios to the eager reference and its ``torch.compile`` measured in the same run."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", add_help=False,
                           help="benchmark harness: ops × providers × modes (`ddfast bench --help`)")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="options of the benchmark harness (--ops, --providers, --quick, --device, --out, ...)")
    bench.set_defaults(handler=lambda args: run(args.args))


def run(argv) -> int:
    from ddfast.benchmarks.harness import main

    return int(main(list(argv)) or 0)
