"""Self-supervised target models for KRR-ST (krr-st-selfsup §4.1): Barlow Twins training of g_φ,
its seeded two-view augmentations, and loading / encoding with the trained target."""

from ddfast.ssl.augment import SSLAugment, make_ssl_augment
from ddfast.ssl.barlow_twins import (
    ARCHS,
    DEFAULT_CONVNET_WIDTHS,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_PROJECTOR,
    DEFAULT_WEIGHT_DECAY,
    PAPER_PROJECTOR,
    SSLEncoder,
    TargetModel,
    barlow_twins_loss,
    build_encoder,
    build_projector,
    encode,
    load_target,
    train_barlow_twins,
)

__all__ = [
    "SSLAugment",
    "make_ssl_augment",
    "barlow_twins_loss",
    "SSLEncoder",
    "build_encoder",
    "build_projector",
    "TargetModel",
    "train_barlow_twins",
    "load_target",
    "encode",
    "ARCHS",
    "DEFAULT_CONVNET_WIDTHS",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_PROJECTOR",
    "PAPER_PROJECTOR",
]
