"""What every subcommand shares: value validators, the help formatter, shared option groups, the
run-folder policy flags, the distributed runner and the error handler."""

from __future__ import annotations

import argparse
import math
import os
import sys



def backend_choices() -> tuple[str, ...]:
    """``--backend`` choices: ``auto``, ``fused`` and every backend the registered ops declare
    (:func:`ddfast.dispatch.backend_choices`)."""
    from ddfast.dispatch import backend_choices as choices

    return choices()


def __getattr__(name):
    if name == "BACKENDS":  # the --backend choices, read from the registry when first asked for
        return backend_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UsageError(Exception):
    """A combination of command-line options that cannot work (exit status 2, like argparse's errors)."""


# ------------------------------------------------------------------------------------------ validators


def _number(kind, text):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    value = _number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


# ------------------------------------------------------------------------------------------ parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help with the default of every option that has one (None / False / store_true defaults omitted)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" not in text and default is not None and default is not False
                and default != argparse.SUPPRESS and action.option_strings
                and not isinstance(action, (argparse._StoreTrueAction, argparse._VersionAction,
                                            argparse._HelpAction))):
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            text += f" (default: {shown})".replace("%", "%%")
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit status 2) and whose subparsers share
    the formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_run_options(p, what: str = "run") -> None:
    """--out is the caller's; --resume / --overwrite follow the one run-folder policy (ddfast.runs)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help=f"continue the unfinished (or extend the finished) {what} in --out; refused, before anything "
                        "is written, if its configuration, data or inputs differ")
    g.add_argument("--overwrite", action="store_true",
                   help=f"delete the {what} in --out and start again (a finished {what} is never replaced without it)")


def add_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_pass_options(p) -> None:
    """--precision / --channels-last / --compile of the network passes (ddfast.network_passes)."""
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="network passes in float32 or under bf16 autocast (data, labels, solves stay float32); "
                        "default: the data set's preset")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="conv nets and images in NHWC (default: the preset)")
    p.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the network; the first steps compile (default: off)")


def pass_overrides(args) -> dict:
    return dict(precision=args.precision, channels_last=args.channels_last, compile=args.compile)


def add_distributed(p) -> None:
    p.add_argument("--distributed", action="store_true",
                   help="one rank of `torchrun --nproc-per-node R` (the default process group; rank 0 writes)")


def distributed_run(handler, args) -> int:
    """``handler`` on every rank of the default process group (gloo on CPU, NCCL with CUDA); only rank 0
    prints, writes the run directory and evaluates."""
    import contextlib

    import torch.distributed as dist

    from ddfast.distributed import init_from_env

    args.process_group = init_from_env()
    main_rank = dist.get_rank() == 0
    if not main_rank:
        if hasattr(args, "evaluate"):
            args.evaluate = 0
        args.no_progress = True
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if main_rank else devnull):
            return handler(args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ errors


def is_expected(exc: BaseException) -> bool:
    """ddfast's own, explained errors (shown as one line) as opposed to bugs (shown with a traceback)."""
    from ddfast.errors import DDFastError

    return isinstance(exc, (DDFastError, UsageError, ValueError, OSError))


def report(exc: BaseException, prog: str = "ddfast") -> int:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
        message = f"{exc.filename}: {message}"
    first, *rest = message.strip().splitlines() or [""]
    print(f"{prog}: error: {first}", file=sys.stderr)
    for line in rest:  # multi-line messages (a backend report) stay readable, each line prefixed
        print(f"{prog}:   {line}", file=sys.stderr)
    return 2 if isinstance(exc, UsageError) else 1


def model_names() -> list[str]:
    from ddfast.models import MODELS

    return sorted(MODELS)
