"""Packaging: ddfast installs beside any recent torch (ranges, not pins), the compiled extension records the
torch it was built against and says to rebuild under another one, and a plain source tree imports
``ddfast.kernels``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ddfast import dispatch
from ddfast.errors import BackendUnavailableError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    try:
        import tomllib
    except ImportError:  # pragma: no cover - python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_dependencies_are_ranges_not_pins():
    meta = _pyproject()
    deps = meta["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.replace(" ", "").startswith("torch"))
    assert torch_dep.replace(" ", "") == "torch>=2.6"
    for extra in meta["project"]["optional-dependencies"].values():
        for dep in extra:
            assert "==" not in dep, dep
            assert not dep.startswith("torch"), f"an extra must not pull another torch: {dep}"
    assert "triton>=3.2" in meta["project"]["optional-dependencies"]["triton"]
    assert not any("==" in r for r in meta["build-system"]["requires"])


def test_installed_torch_satisfies_the_lower_bound():
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    assert (major, minor) >= (2, 6)
    assert hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


@pytest.fixture
def fresh_extension_state():
    dispatch._load_extension.cache_clear()
    yield
    dispatch._load_extension.cache_clear()


def test_extension_built_for_another_torch_says_how_to_rebuild(monkeypatch, fresh_extension_state):
    monkeypatch.setattr(dispatch, "built_torch_version", lambda: "1.13.1+cu117")
    with pytest.raises(BackendUnavailableError) as info:
        dispatch.extension()
    msg = str(info.value)
    assert "built against torch 1.13.1+cu117" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation --no-deps -e ." in msg and "build_ext --inplace" in msg
    # every compiled backend reports it; the reference still runs
    assert dispatch.backends()["cpu"]["available"] is False
    assert "1.13.1" in dispatch.backends()["cpu"]["reason"]


def test_same_release_with_another_local_tag_is_accepted(monkeypatch, fresh_extension_state):
    release = torch.__version__.split("+")[0]
    monkeypatch.setattr(dispatch, "built_torch_version", lambda: release + "+somebuild")
    if dispatch._load_extension()[0] is None:
        pytest.skip("compiled extension not built")
    assert dispatch.extension() is not None


def test_build_records_the_torch_version():
    ext = pytest.importorskip("ddfast._C", reason="compiled extension not built")
    info = ext.build_info()
    assert info["torch_version"] == torch.__version__
    recorded = dispatch.built_torch_version()
    assert recorded is None or recorded == info["torch_version"]


def test_source_tree_imports_kernels_without_an_install(tmp_path):
    """``python setup.py build_ext --inplace`` + the source tree on sys.path: ``ddfast.kernels`` (the
    ``kernels/`` folder, mapped by package_dir in an install) must import."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {ROOT!r})
        import ddfast
        import ddfast.kernels.relu_max_pool2d as k
        assert k.__file__.startswith({os.path.join(ROOT, "kernels")!r}), k.__file__
        print("KERNELS-OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(tmp_path),
                          env=dict(os.environ, TRITON_INTERPRET="1"), timeout=300)
    assert proc.returncode == 0 and "KERNELS-OK" in proc.stdout, proc.stderr[-3000:]
