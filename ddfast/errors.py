"""Typed errors and warnings raised by ddfast.

Every error class here derives from :class:`DDFastError`, so a caller (the ``ddfast`` command line among
them) can tell ddfast's own, explained errors from bugs. Each also derives from the built-in class a
caller would expect (``ValueError`` for bad files and settings, ``RuntimeError`` for numerical failures,
``FileNotFoundError`` for missing data), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

import os


class DDFastError(Exception):
    """Base of the errors ddfast raises on purpose (its message says what went wrong and what to do)."""


class NotPSDError(DDFastError, RuntimeError):
    """The regularised Gram matrix stayed non-positive-definite after the jitter policy
    of :mod:`ddfast.settings` was exhausted."""


class BackendUnavailableError(DDFastError, RuntimeError):
    """No backend can run the given inputs; the message lists every backend and why."""


class HigherOrderUnsupportedError(DDFastError, RuntimeError):
    """A second derivative (double backward, ``torch.func.hessian``, a jvp of a gradient, ...) was taken
    through a fused path that is exact to first order only; the message names the op and what to use
    instead (its ``backend="reference"``)."""


class ArtifactError(DDFastError, ValueError):
    """A stored artifact (run folder file, checkpoint, target model, trajectory) is missing, unreadable,
    damaged or fails a value check. ``path`` names the file, ``problem`` what failed, ``hint`` what to do."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str = ""):
        self.path, self.problem, self.hint = str(path), problem, hint
        super().__init__(f"{self.path}: {problem}" + (f"; {hint}" if hint else ""))


class RunFolderError(DDFastError, ValueError):
    """A run folder cannot be used as asked: another process writes it, a finished run would be
    overwritten, or ``resume`` was asked with a different configuration, data set or input."""


class DatasetNotFoundError(DDFastError, FileNotFoundError):
    """A data set file or folder is missing; the message names the path and how to obtain it."""

    def __init__(self, path: str | os.PathLike, hint: str = ""):
        self.path = str(path)
        message = f"data set not found: {self.path}"
        super().__init__(f"{message}. {hint}" if hint else message)


class DatasetFormatError(DDFastError, ValueError):
    """A data set file exists but is corrupt, truncated, too large or not in the expected format."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


class NumericalWarning(RuntimeWarning):
    """A solve needed diagonal jitter to factor (see :mod:`ddfast.settings`)."""
