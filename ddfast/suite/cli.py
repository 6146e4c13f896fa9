"""Command line of the suite: ``run``, ``report``, ``list``, ``cell``.

``add_parser(subparsers)`` adds ``suite`` (with these sub-commands) to another argparse parser (``ddfast suite
...``); ``main(argv)`` runs them stand-alone (``python -m ddfast.suite ...``).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "build_parser", "main", "dispatch"]


def _add_commands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="suite_command", required=True)
    r = sub.add_parser("run", help="run a suite (finished cells are skipped, interrupted ones resumed)")
    r.add_argument("config", help="suite TOML file, or a built-in name (quickstart)")
    r.add_argument("--out", help="run root (default: [suite] out, else runs/suite-<name>)")
    r.add_argument("--jobs", "-j", type=int, default=1, help="cells in parallel worker processes (default 1)")
    r.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local processes, or one Slurm job per cell through submitit")
    r.add_argument("--cluster", default=None,
                   help="submitit cluster: default auto (Slurm when available); 'local' or 'debug' to test")
    r.add_argument("--shard", help="run only shard i of n ('i/n', 0 <= i < n), for machines without Slurm")
    r.add_argument("--inline", action="store_true", help="run the cells in this process, one after another")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--report", metavar="DIR", help="also write the report (markdown + plots) into DIR")
    rep = sub.add_parser("report", help="markdown tables and plots from a run root or its results.csv")
    rep.add_argument("source", help="a run root (re-collected from the cell folders) or a results.csv")
    rep.add_argument("--out", help="report folder (default docs/results/<name>)")
    rep.add_argument("--name", help="suite name (default: from the table, else the folder name)")
    rep.add_argument("--readme", help="replace the table between <!-- suite-table:NAME --> markers in this file")
    rep.add_argument("--no-plots", action="store_true")
    ls = sub.add_parser("list", help="the cells of a suite with their ids and status (creates their folders)")
    ls.add_argument("config")
    ls.add_argument("--out")
    ls.add_argument("--shard")
    c = sub.add_parser("cell", help="run one cell folder in this process (under torchrun for a distributed cell)")
    c.add_argument("run_dir")
    c.add_argument("--no-progress", action="store_true")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``suite`` to ``subparsers`` (from ``parser.add_subparsers()``); its handler is :func:`dispatch`."""
    p = subparsers.add_parser("suite", help="benchmark suites: run, report, list, cell",
                              description="Benchmark suites over methods × data sets × sizes × seeds (docs/suite.md).")
    _add_commands(p)
    p.set_defaults(func=dispatch, handler=dispatch)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddfast.suite",
                                description="Benchmark suites over methods × data sets × sizes × seeds (docs/suite.md).")
    _add_commands(p)
    return p


def _run(args) -> int:
    from ddfast.suite.config import load_config
    from ddfast.suite.report import accuracy_table, gain_table, write_report
    from ddfast.suite.runner import parse_shard, run_suite

    cfg = load_config(args.config, out=args.out)
    out = run_suite(cfg, jobs=args.jobs, launcher=args.launcher, shard=parse_shard(args.shard),
                    progress=not args.no_progress, inline=args.inline, cluster=args.cluster)
    rows = out["rows"]
    print(f"\n{cfg.name}: test accuracy (%), mean ± std over students and seeds\n")
    print(accuracy_table(rows))
    if any(r.get("gain_over_random") is not None for r in rows):
        print("\n" + gain_table(rows))
    if args.report:
        written = write_report(rows, args.report, cfg.name)
        print(f"\nreport: {written['markdown']}")
    return 1 if out["failed"] else 0


def _report(args) -> int:
    from ddfast.suite.report import accuracy_table, update_readme, write_report
    from ddfast.suite.results import collect, read_table

    src = args.source
    if os.path.isdir(src):
        name = args.name or os.path.basename(os.path.normpath(src)).removeprefix("suite-")
        rows = collect(src, suite=name)
        csv_path = None
    elif os.path.exists(src):
        rows = read_table(src)
        name = args.name or next((r["suite"] for r in rows if r.get("suite")), None) or \
            os.path.basename(os.path.dirname(os.path.abspath(src)))
        csv_path = src
    else:
        print(f"report: {src} is neither a run root nor a results.csv", file=sys.stderr)
        return 2
    if not rows:
        print(f"report: no cells in {src}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("docs", "results", name)
    written = write_report(rows, out, name, plots=not args.no_plots, csv_path=csv_path)
    for k, v in written.items():
        print(f"{k}: {v}")
    if args.readme:
        if update_readme(args.readme, name, accuracy_table(rows)):
            print(f"readme: {args.readme} (table {name})")
        else:
            print(f"readme: no <!-- suite-table:{name} --> markers in {args.readme}", file=sys.stderr)
            return 2
    return 0


def _list(args) -> int:
    from ddfast.suite.cell import write_cell
    from ddfast.suite.config import load_config
    from ddfast.suite.runner import parse_shard, select_shard

    cfg = load_config(args.config, out=args.out)
    for c in select_shard(cfg.cells, parse_shard(args.shard)):
        d = write_cell(cfg.out, c)  # the folder a `cell` command (e.g. under torchrun) runs
        status = "done" if os.path.exists(os.path.join(d, "results.json")) else \
            "failed" if os.path.exists(os.path.join(d, "failure.json")) else \
            "started" if os.path.exists(os.path.join(d, "meta.json")) else "pending"
        print(f"{c.id}  {status:8s} {c.label}  regimes={','.join(c.config['regimes'])}")
    print(f"{len(cfg.cells)} cells; run root {cfg.out} (folders: {os.path.join(cfg.out, 'cells', '<id>')})")
    return 0


def _cell(args) -> int:
    from ddfast.suite.runner import run_one

    res = run_one(args.run_dir, progress=not args.no_progress)
    return 0 if res.get("status") == "done" else 1


def dispatch(args) -> int:
    return {"run": _run, "report": _report, "list": _list, "cell": _cell}[args.suite_command](args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
