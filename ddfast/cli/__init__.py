"""The ``ddfast`` command line, one module per subcommand family:

- :mod:`ddfast.cli.distill` — ``distill ld | krr-st | ead``, ``evaluate``;
- :mod:`ddfast.cli.train` — ``trajectory``, ``ssl``;
- :mod:`ddfast.cli.tables` — ``ld-table``, ``krr-st-table``, ``ead-table``, ``softlabel-table``, ``dcs``,
  ``e2e-parity``;
- :mod:`ddfast.cli.bench` — ``bench`` (the benchmark harness, :mod:`ddfast.benchmarks.harness`);
- ``suite`` — benchmark suites (:mod:`ddfast.suite.cli`); ``info``.

Each module's ``add_parsers(subparsers)`` registers its subcommands with ``handler=`` defaults. Errors ddfast
raises on purpose (bad settings, damaged files, a refused ``--resume``) are printed as one line,
``ddfast: error: ...``, with exit status 1 (2 for usage errors); ``ddfast --debug ...`` or
``DDFAST_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from ddfast.cli._common import Parser, UsageError, distributed_run, is_expected, report

__all__ = ["main", "build_parser", "run", "UsageError"]


def build_parser() -> Parser:
    from ddfast import __version__
    from ddfast.cli import bench, distill, tables, train

    parser = Parser(prog="ddfast", description="ddfast: fused kernels and distillers for dataset distillation")
    parser.add_argument("--version", action="version", version=f"ddfast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="which backends are built and usable here")
    info.set_defaults(handler=_info)
    for module in (distill, train, tables, bench):
        module.add_parsers(sub)
    from ddfast.suite.cli import add_parser as add_suite

    add_suite(sub)
    return parser


def _info(args) -> int:
    from ddfast.info import main as info_main

    info_main()
    return 0


def run(argv=None) -> int:
    """Parse ``argv`` and run the subcommand; errors propagate (``main`` reports them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == "bench" and set(argv[:command]) <= {"--debug"}:
        from ddfast.cli import bench

        return bench.run(argv[command + 1:])  # the harness parses its own options
    args = build_parser().parse_args(argv)
    if getattr(args, "distributed", False):
        return distributed_run(args.handler, args)
    return int(args.handler(args) or 0)


def main(argv=None) -> int:
    """The ``ddfast`` entry point: :func:`run`, with ddfast's own errors as one ``ddfast: error:`` line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv[:1] or os.environ.get("DDFAST_DEBUG", "") not in ("", "0")
    try:
        return run(argv)
    except SystemExit as e:  # argparse: --help / --version (0) and usage errors (2, already printed)
        if isinstance(e.code, int) or e.code is None:
            return int(e.code or 0)
        print(f"ddfast: error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("ddfast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into explained errors and bugs below
        if debug or not is_expected(e):
            raise
        return report(e)
