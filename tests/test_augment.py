"""ddfast.augment: Siamese DSA shares one ω between batches, per-image DSA, crops, CutMix, the old import paths."""

import pytest
import torch

from ddfast.augment import (DSA_FAMILIES, apply_dsa, cutmix, dsa_augment, random_crop_flip, random_resized_crop,
                            sample_dsa, siamese_dsa)


def _x(n=6, c=3, s=9, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_siamese_identical_inputs_give_identical_outputs(family):
    # One ω applied to both sides: equal inputs stay equal after augmentation, whatever the batch sizes.
    x = _x()
    for seed in range(8):
        a, b, c = siamese_dsa(x, x.clone(), x[:2].clone(), generator=torch.Generator().manual_seed(seed), families=(family,))
        assert torch.equal(a, b)
        assert torch.equal(a[:2], c)
        # and every image got the same ω: identical images in a batch stay identical
        (d,) = siamese_dsa(x[:1].expand(4, -1, -1, -1).contiguous(), generator=torch.Generator().manual_seed(seed),
                           families=(family,))
        assert all(torch.equal(d[0], d[i]) for i in range(4))


def test_siamese_is_not_two_generators_seeded_alike():
    # The defect this replaces: per-image draws from two equally seeded generators diverge once the batch
    # sizes differ. Shared parameters do not.
    x = _x(5)
    for family in ("scale", "color", "crop", "cutout"):
        g = torch.Generator().manual_seed(1)
        big, small = siamese_dsa(x, x[:2], generator=g, families=(family,))
        assert torch.equal(big[:2], small)
        old_big = dsa_augment(x, torch.Generator().manual_seed(1), (family,))
        old_small = dsa_augment(x[:2], torch.Generator().manual_seed(1), (family,))
        assert not torch.equal(old_big[1], old_small[1])


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_dsa_per_image_and_deterministic(family):
    x = _x(16)
    a = dsa_augment(x, torch.Generator().manual_seed(3), (family,))
    b = dsa_augment(x, torch.Generator().manual_seed(3), (family,))
    assert torch.equal(a, b) and a.shape == x.shape
    # per-image parameters: a batch of one image copied 16 times does not come out all equal
    same = x[:1].expand(16, -1, -1, -1).contiguous()
    out = dsa_augment(same, torch.Generator().manual_seed(3), (family,))
    assert not all(torch.equal(out[0], out[i]) for i in range(16))


def test_dsa_is_differentiable_and_checks_params():
    x = _x(4).requires_grad_(True)
    for family in DSA_FAMILIES:
        (y,) = siamese_dsa(x, generator=torch.Generator().manual_seed(0), families=(family,))
        (g,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.isfinite(g).all()
    p = sample_dsa(3, (9, 9), torch.Generator().manual_seed(0), ("rotate",))
    with pytest.raises(ValueError, match="params: drawn for 3 images"):
        apply_dsa(_x(4), p)
    with pytest.raises(ValueError, match="families"):
        sample_dsa(1, (9, 9), torch.Generator(), ("blur",))
    assert apply_dsa(_x(0), sample_dsa(1, (9, 9), torch.Generator(), ("crop",))).shape[0] == 0


def test_flip_family_is_an_exact_mirror():
    x = _x(1)
    for seed in range(10):
        (y,) = siamese_dsa(x, generator=torch.Generator().manual_seed(seed), families=("flip",))
        assert torch.equal(y, x) or torch.equal(y, x.flip(3))


def test_random_resized_crop():
    x = _x(5)
    a = random_resized_crop(x, torch.Generator().manual_seed(0))
    b = random_resized_crop(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    # the whole image at aspect 1, no flip: the identity resampling
    same = random_resized_crop(x, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(same, x, rtol=0, atol=1e-5)
    # half the area: the centre of a constant-ramp image is magnified (values span a smaller range)
    ramp = torch.linspace(-1, 1, 9).view(1, 1, 1, 9).expand(1, 1, 9, 9).contiguous()
    small = random_resized_crop(ramp, torch.Generator(), scale=(0.25, 0.25), ratio=(1.0, 1.0), flip=False)
    assert float(small.max() - small.min()) < 1.5
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(x, torch.Generator(), scale=(0.0, 2.0))


def test_crop_flip_and_cutmix_shapes_and_content():
    x = _x(4)
    y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0, flip=False)
    assert torch.equal(y, x)
    m = cutmix(x, torch.Generator().manual_seed(2))
    assert m.shape == x.shape
    # every pixel comes from some image of the batch at the same position
    match = (m[:, None] == x[None]).all(2)  # [b, b, h, w]
    assert match.any(1).all()


def test_old_import_paths_still_work():
    from ddfast.evaluate.regimes import cutmix as c2, kd_kl_loss
    from ddfast.evaluate.transfer import DSA_FAMILIES as F2, dsa_augment as d2, random_crop_flip as r2
    from ddfast.losses import kd_kl_loss as k2, outer_loss, soft_cross_entropy
    from ddfast.reference.label_metagrad import outer_loss as o2, soft_cross_entropy as s2
    from ddfast.ssl.augment import SSLAugment, make_ssl_augment
    from ddfast.augment.views import SSLAugment as S2

    assert (c2, F2, d2, r2, kd_kl_loss, o2, s2, SSLAugment) == (cutmix, DSA_FAMILIES, dsa_augment, random_crop_flip,
                                                               k2, outer_loss, soft_cross_entropy, S2)
    assert make_ssl_augment(3, (0.5,), (0.5,)).channels == 3
