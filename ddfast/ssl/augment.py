"""Self-supervised views; they live in :mod:`ddfast.augment.views` (re-exported here)."""

from ddfast.augment.views import SSLAugment, make_ssl_augment

__all__ = ["SSLAugment", "make_ssl_augment"]
