"""ddfast: fused, correct kernels for dataset distillation in PyTorch."""

from ddfast import errors, settings
from ddfast.dispatch import backends
from ddfast.ops import krr_predict, ridge_weights

__version__ = "0.1.0"
__all__ = ["backends", "ridge_weights", "krr_predict", "errors", "settings", "__version__"]
