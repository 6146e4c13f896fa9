"""Test configuration: Triton kernels run under the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator executes, i.e. before
``ddfast.kernels`` is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ddfast.dispatch import backends  # noqa: E402


def available_backends():
    return {name for name, st in backends().items() if st["available"]}


def backend_param(name):
    """A pytest param for a backend that skips with the reason when it is not usable here."""
    st = backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(not st["available"], reason=f"{name}: {st['reason']}"), id=name)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_generate_tests(metafunc):
    """Parametrize contract classes (tests/contract.py) from their class attributes."""
    cls = metafunc.cls
    if cls is None or not hasattr(cls, "parity_cases"):
        return
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", cls.backends)
    if "gcase" in metafunc.fixturenames:
        metafunc.parametrize("gcase", cls.gradcheck_cases, ids=[c.id for c in cls.gradcheck_cases])
    if "pcase" in metafunc.fixturenames:
        metafunc.parametrize("pcase", cls.parity_cases, ids=[c.id for c in cls.parity_cases])
