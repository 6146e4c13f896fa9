"""Test configuration: where the Triton kernels run, and which device each backend's tests use.

* No CUDA device visible: ``TRITON_INTERPRET=1`` (the Triton kernels run in the interpreter on CPU
  tensors). It must be set before any ``@triton.jit`` decorator executes, i.e. before ``ddfast.kernels``
  is imported, so it is decided here, at collection, from the environment and
  ``torch.cuda.is_available()`` (a driver query, no CUDA context). An explicit ``TRITON_INTERPRET`` in the
  environment always wins (``TRITON_INTERPRET=0`` on a GPU machine runs the compiled kernels).
* A CUDA device visible: the interpreter stays off, and the ``triton`` and ``cuda`` backends' tests
  run on CUDA tensors (:func:`device_for`, the ``device`` fixture, ``tests/contract.py``), against the
  reference on the same device. CPU-only backends keep CPU tensors.

``DDFAST_GPU_TESTS_ON_CPU=1`` runs the GPU-only test files (``tests/test_gpu_*.py``) on CPU tensors
instead of skipping them (a dry run of their logic on a machine without a GPU).
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ddfast.dispatch import backends  # noqa: E402

# Backends whose tests move to CUDA tensors when a GPU is visible.
GPU_BACKENDS = ("triton", "cuda")


def device_for(backend) -> torch.device:
    """The device a backend's test tensors live on: CUDA for ``triton`` / ``cuda`` on a GPU machine,
    else CPU (the interpreter runs Triton on CPU tensors; ``cuda`` then skips as unavailable)."""
    if CUDA and backend in GPU_BACKENDS:
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend) -> bool:
    """Whether ``backend`` runs in the Triton interpreter here (slow: keep such cases small)."""
    return backend == "triton" and device_for(backend).type == "cpu"


def available_backends():
    return {name for name, st in backends().items() if st["available"]}


def backend_param(name):
    """A pytest param for a backend that skips with the reason when it is not usable here."""
    st = backends()[name]
    return pytest.param(name, marks=pytest.mark.skipif(not st["available"], reason=f"{name}: {st['reason']}"), id=name)


def op_backend_params(op, *, reference=True):
    """pytest params for every backend the registry declares for ``op`` (ddfast.dispatch.registered_ops), in
    ``auto`` order; a new backend of an op is tested without editing the test files."""
    from ddfast.dispatch import registered_ops

    names = [b for b in registered_ops()[op] if reference or b != "reference"]
    return [backend_param(b) for b in names]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if CUDA:
        torch.cuda.manual_seed_all(0)


@pytest.fixture
def device(request):
    """The device for this test's tensors: :func:`device_for` of its ``backend`` parameter (CPU when the
    test has none)."""
    backend = request.getfixturevalue("backend") if "backend" in request.fixturenames else None
    return device_for(backend)


@pytest.fixture
def gpu_device():
    """CUDA for the GPU-only tests; CPU when ``DDFAST_GPU_TESTS_ON_CPU=1`` (dry run); else skip."""
    if CUDA:
        return torch.device("cuda")
    if os.environ.get("DDFAST_GPU_TESTS_ON_CPU", "") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device visible (DDFAST_GPU_TESTS_ON_CPU=1 dry-runs this test on CPU)")


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


# Messages with which a backend refuses inputs on the wrong device (dispatch, kernels' reasons).
_WRONG_DEVICE = ("inputs are not CUDA tensors", "CPU tensors need TRITON_INTERPRET=1", "takes CPU tensors",
                 "inputs are on cpu", "inputs are on cuda", "kernels take cuda tensors")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """On a GPU machine, a test that hands CPU tensors to the ``triton`` / ``cuda`` backend (it was
    written for the interpreter) is skipped with the reason instead of failing; every other outcome
    stands. Without a GPU this hook does nothing (CPU runs stay exactly as they are)."""
    outcome = yield
    if not CUDA or outcome.excinfo is None or not hasattr(outcome, "force_exception"):  # pluggy >= 1.1
        return
    from ddfast.errors import BackendUnavailableError

    exc = outcome.excinfo[1]
    params = getattr(getattr(item, "callspec", None), "params", {})
    if (isinstance(exc, BackendUnavailableError) and params.get("backend") in GPU_BACKENDS
            and any(m in str(exc) for m in _WRONG_DEVICE)):
        outcome.force_exception(pytest.skip.Exception(
            f"{params['backend']}: test builds tensors for the other device ({str(exc).splitlines()[0][:160]})",
            _use_item_location=True))
