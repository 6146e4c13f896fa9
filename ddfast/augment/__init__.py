"""Augmentations every method and evaluation uses, with one random-parameter helper (:mod:`.params`).

* :mod:`.dsa` — Differentiable Siamese Augmentation: :func:`sample_dsa` / :func:`apply_dsa`,
  :func:`dsa_augment` (per-image parameters), :func:`siamese_dsa` (one ω shared by several batches);
* :mod:`.crop` — :func:`random_crop_flip` (pad-and-crop + flip), :func:`random_resized_crop`;
* :mod:`.cutmix` — :func:`cutmix`;
* :mod:`.views` — :class:`SSLAugment` / :func:`make_ssl_augment`, the self-supervised two-view recipe.
"""

from ddfast.augment.crop import random_crop_flip, random_resized_crop, resized_crop_theta
from ddfast.augment.cutmix import cutmix
from ddfast.augment.dsa import DSA_FAMILIES, DSAParams, apply_dsa, check_families, dsa_augment, sample_dsa, siamese_dsa
from ddfast.augment.views import SSLAugment, make_ssl_augment

__all__ = ["DSA_FAMILIES", "DSAParams", "sample_dsa", "apply_dsa", "dsa_augment", "siamese_dsa", "check_families",
           "random_crop_flip", "random_resized_crop", "resized_crop_theta", "cutmix", "SSLAugment", "make_ssl_augment"]
