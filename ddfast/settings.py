"""Numerical knobs of ddfast, each a scoped context manager (linear_operator's ``settings`` style).

    with ddfast.settings.max_jitter_tries(6), ddfast.settings.check_finite(False):
        ...                                   # these values here, the previous ones restored on exit
    ddfast.settings.max_jitter_tries.value()  # the value in force (also: int(...), range(...), bool(...))
    ddfast.settings.max_jitter_tries.set(6)   # change it for the rest of the process

A knob behaves as its value where a number or a flag is expected (``range(settings.max_jitter_tries)``,
``not settings.check_finite``, ``settings.max_jitter_tries - 1``), so code that reads the module
attributes keeps working; scopes nest and are restored even when the block raises. Values are checked
when set (a ``ValueError`` names the knob).

Jitter policy for the ridge / kernel-ridge solves (``ddfast.ops.ridge_solve``):

* The regularised Gram ``A = K + μI`` is factored with a Cholesky decomposition. Batch
  members whose factorization fails (a pivot ``<= 0`` or non-finite, e.g. duplicate rows
  with a tiny λ in float32) are re-factored **alone** with extra diagonal jitter
  ``ε·10^k · mean(diag(A))`` for ``k = 0 … max_jitter_tries-1``, where ``ε`` is
  ``jitter_float32`` or ``jitter_float64`` by the solve dtype. Members that factor
  first time are untouched.
* The first time jitter is needed a :class:`ddfast.errors.NumericalWarning` is issued
  (once per process for each call site, Python's default warning filter).
* If a member still fails, :class:`ddfast.errors.NotPSDError` is raised: a solve never
  returns NaN silently.
* ``check_finite``: the op's (small) output is checked for NaN/Inf — one reduction and one host
  sync per call; NaN/Inf inputs always reach it. A non-finite result raises ``ValueError`` naming the
  non-finite input, or ``NotPSDError`` when every input is finite.

The gradient of a jittered member is the exact gradient of the jittered system.
"""

from __future__ import annotations

import math
import operator

__all__ = ["jitter_float32", "jitter_float64", "max_jitter_tries", "check_finite", "jitter_for", "Knob"]


class _Scope:
    def __init__(self, knob: "Knob", value):
        self.knob, self.value, self._saved = knob, knob._check(value), []

    def __enter__(self):
        self._saved.append(self.knob._value)
        self.knob._value = self.value
        return self.knob

    def __exit__(self, *exc):
        self.knob._value = self._saved.pop()
        return False


def _binary(op, reflected=False):
    def method(self, other):
        other = other._value if isinstance(other, Knob) else other
        return op(other, self._value) if reflected else op(self._value, other)
    return method


class Knob:
    """One setting: ``knob(value)`` is a context manager, :meth:`value` / :meth:`set` read and write it,
    and the knob stands for its value in arithmetic, comparisons, ``int`` / ``float`` / ``bool`` / indices."""

    def __init__(self, name: str, default, kind: type, check=None, doc: str = ""):
        self.name, self.kind, self._predicate, self.__doc__ = name, kind, check, doc
        self._value = self._check(default)

    def _check(self, value):
        if isinstance(value, Knob):
            value = value._value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name}: expected True or False, got {value!r}")
        elif self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{self.name}: expected an int, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name}: expected a finite number, got {value!r}")
            value = float(value)
        if self._predicate is not None and not self._predicate(value):
            raise ValueError(f"{self.name}: {value!r} is out of range ({self.__doc__})")
        return value

    def value(self):
        """The value in force."""
        return self._value

    def set(self, value) -> None:
        """Change the value for the rest of the process (outside any scope)."""
        self._value = self._check(value)

    def __call__(self, value) -> _Scope:
        return _Scope(self, value)

    def __repr__(self):
        return f"ddfast.settings.{self.name}({self._value!r})"

    def __format__(self, spec):
        return format(self._value, spec)

    def __bool__(self):
        return bool(self._value)

    def __int__(self):
        return int(self._value)

    def __float__(self):
        return float(self._value)

    def __index__(self):
        return operator.index(self._value)

    def __hash__(self):
        return hash(self._value)

    __eq__ = _binary(operator.eq)
    __ne__ = _binary(operator.ne)
    __lt__ = _binary(operator.lt)
    __le__ = _binary(operator.le)
    __gt__ = _binary(operator.gt)
    __ge__ = _binary(operator.ge)
    __add__, __radd__ = _binary(operator.add), _binary(operator.add, True)
    __sub__, __rsub__ = _binary(operator.sub), _binary(operator.sub, True)
    __mul__, __rmul__ = _binary(operator.mul), _binary(operator.mul, True)
    __truediv__, __rtruediv__ = _binary(operator.truediv), _binary(operator.truediv, True)
    __pow__, __rpow__ = _binary(operator.pow), _binary(operator.pow, True)


jitter_float32 = Knob("jitter_float32", 1e-6, float, lambda v: v > 0,
                      "base relative jitter ε of float32 solves, > 0")
jitter_float64 = Knob("jitter_float64", 1e-10, float, lambda v: v > 0,
                      "base relative jitter ε of float64 solves, > 0")
max_jitter_tries = Knob("max_jitter_tries", 4, int, lambda v: v >= 0,
                        "jittered re-factorisations before NotPSDError, >= 0")
check_finite = Knob("check_finite", True, bool, None, "check the ops' outputs for NaN/Inf")


def jitter_for(dtype) -> float:
    """Base relative jitter ε for a solve in ``dtype`` (a plain float)."""
    import torch

    return float(jitter_float64 if dtype == torch.float64 else jitter_float32)
