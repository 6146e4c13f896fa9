"""ddfast: fused, correct kernels for dataset distillation in PyTorch."""

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """``ddfast.kernels`` lives in ``kernels/`` (a package_dir mapping); an install maps it, a plain source
    tree (``python setup.py build_ext --inplace`` and ``PYTHONPATH``) gets it mapped here."""
    import importlib.util
    import os
    import sys

    if "ddfast.kernels" in sys.modules or importlib.util.find_spec("ddfast.kernels") is not None:
        return
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("ddfast.kernels", init, submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddfast.kernels"] = module
    spec.loader.exec_module(module)


_source_tree_kernels()

from ddfast import errors, settings  # noqa: E402
from ddfast.dispatch import backends  # noqa: E402
from ddfast.ops import krr_predict, ridge_weights  # noqa: E402

__all__ = ["backends", "ridge_weights", "krr_predict", "errors", "settings", "__version__"]
