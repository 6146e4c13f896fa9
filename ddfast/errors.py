"""Typed errors and warnings raised by ddfast."""


class NotPSDError(RuntimeError):
    """The regularised Gram matrix stayed non-positive-definite after the jitter policy
    of :mod:`ddfast.settings` was exhausted."""


class BackendUnavailableError(RuntimeError):
    """No backend can run the given inputs; the message lists every backend and why."""


class NumericalWarning(RuntimeWarning):
    """A solve needed diagonal jitter to factor (see :mod:`ddfast.settings`)."""
