"""Dataset Condensation with gradient matching, DC (soft-labels-hard-truths supp. §1.2, eq. 6; Zhao et al. 2020).

    S* = argmin_S E_{θ_0 ~ P_θ0} [ Σ_{t=0}^{T−1} D(∇_θ L_S(θ_t), ∇_θ L_T(θ_t)) ]
    s.t. θ_{t+1} = opt_alg_θ(L_S(θ_t), ς_θ, η_θ)                                              (eq. 6)

One :meth:`DCDistiller.step` is one outer iteration: a freshly initialised network θ_0, then ``outer_loop``
times (t = 0 .. T−1, T = ``outer_loop``):

1. for every class c, the CE gradients w.r.t. θ_t of a real class batch (``real_batch`` images, a
   constant) and of the class's synthetic images (differentiable w.r.t. the images);
2. one SGD step (lr ``lr_images``, momentum 0.5) of the images on Σ_c D(g_real_c, g_syn_c);
3. except after the last matching: ``inner_loop`` (ς_θ) full-batch SGD steps of the network on the
   (detached) synthetic set with lr ``lr_net`` (η_θ = 0.01).

D is the layer-wise distance of the DC paper, :func:`gradient_distance`: every parameter gradient is
reshaped to ``[out, -1]`` and Σ_rows (1 − cos(g_real_row, g_syn_row)) is summed over the parameters.
1-D tensors (biases, norm affine parameters) are skipped by default, as in the DC code
(``bias="skip"``); ``bias="row"`` treats them as one row ``[1, n]`` instead. The cosine has the DC
code's 1e-6 in the denominator, so identical gradients give ≈ 0 (not exactly 0) and opposite ones ≈ 2
per row.

Details:

* Networks are built under a seed drawn from the distiller's generator (a resumed run continues
  bit-identically; nothing but the generator carries over between outer iterations).
* ``augment=True`` gives DC with Siamese DSA (one ω per class drawn once and applied to the real and the
  synthetic batch, :func:`ddfast.augment.siamese_dsa`; per-image DSA on the synthetic set in the inner
  loop), as in the DSA code; the default is plain DC.
* With ``norm="batch"`` the per-class batches are normalised with their own statistics (the DC code's
  freezing of BatchNorm statistics is not reproduced: deviation, the default network uses instance norm,
  so it does not arise by default).
* CPU scale: a 2-block ConvNet at 8×8 and few outer iterations by default (deviation from the paper's
  ConvNet-D3 at 32×32 and 1,000 iterations).
* ``process_group=``: the whole step runs on every rank (replicated; no speed-up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddfast.distill.common import ImageDistiller, check_common_config
from ddfast.augment.dsa import DSA_FAMILIES, dsa_augment, siamese_dsa
from ddfast.distill.dm import check_pair, fresh_network

__all__ = ["DCConfig", "DCDistiller", "dc_loss", "gradient_distance", "BIAS_MODES"]

BIAS_MODES = ("skip", "row")


@dataclass
class DCConfig:
    """Hyper-parameters of DC; defaults are the CPU-scale digits preset."""

    ipc: int = 10  # synthetic images per class
    iterations: int = 100  # outer iterations (fresh networks)
    outer_loop: int = 5  # T: image updates per network
    inner_loop: int = 5  # ς_θ: network SGD steps on S between image updates
    real_batch: int = 128  # real images per class and matching
    lr_images: float = 0.1  # SGD, momentum 0.5 (DC code)
    lr_net: float = 0.01  # η_θ
    bias: str = "skip"  # 1-D parameter gradients: "skip" (DC code) | "row"
    augment: bool = False  # Siamese DSA (DC+DSA)
    dsa_families: tuple[str, ...] = DSA_FAMILIES
    widths: tuple[int, ...] = (64, 128)  # default ConvNet (instance norm)
    norm: str = "instance"
    init: str = "real"  # "real" | "noise"
    seed: int = 0

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        self.dsa_families = tuple(self.dsa_families)


def gradient_distance(g_real_list, g_syn_list, bias: str = "skip") -> torch.Tensor:
    """The DC layer-wise gradient distance D (eq. 6, supp. §1.2).

    D = Σ_params Σ_rows (1 − ⟨a_i, b_i⟩ / (‖a_i‖ ‖b_i‖ + 1e-6)) with a, b the real and synthetic
    gradient of one parameter reshaped to ``[out, -1]``. 1-D gradients are skipped (``bias="skip"``,
    the DC code) or taken as one row ``[1, n]`` (``bias="row"``); 0-D ones are taken as ``[1, 1]``.

    Args:
        g_real_list, g_syn_list: sequences of gradients, matched by position and shape.
        bias: ``"skip"`` or ``"row"``.

    Returns:
        a scalar tensor; ≈ 0 for identical gradients, ≈ 2 per row for opposite ones.
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    g_real_list, g_syn_list = list(g_real_list), list(g_syn_list)
    if len(g_real_list) != len(g_syn_list) or not g_real_list:
        raise ValueError(f"g_syn_list: expected {len(g_real_list)} gradients like g_real_list (at least one), "
                         f"got {len(g_syn_list)}")
    total = None
    for i, (a, b) in enumerate(zip(g_real_list, g_syn_list)):
        if a.shape != b.shape:
            raise ValueError(f"g_syn_list[{i}]: expected shape {tuple(a.shape)} like g_real_list[{i}], got {tuple(b.shape)}")
        if a.dim() == 1 and bias == "skip":
            continue
        a, b = (a.reshape(1, -1), b.reshape(1, -1)) if a.dim() <= 1 else (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
        d = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
        total = d if total is None else total + d
    return total if total is not None else g_syn_list[0].new_zeros(())


def class_gradients(net: nn.Module, x: torch.Tensor, c: int, create_graph: bool) -> tuple[torch.Tensor, ...]:
    """∇_θ CE(net(x), c) for a batch of one class c."""
    params = [p for p in net.parameters() if p.requires_grad]
    target = torch.full((x.shape[0],), c, dtype=torch.int64, device=x.device)
    loss = F.cross_entropy(net(x), target)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def dc_loss(x_syn: torch.Tensor, y_syn: torch.Tensor, x_real: torch.Tensor, y_real: torch.Tensor, net: nn.Module,
            bias: str = "skip", generator: torch.Generator | None = None, augment: bool = False,
            families: tuple[str, ...] = DSA_FAMILIES) -> torch.Tensor:
    """The DC matching loss (eq. 6, one term of the sum, supp. §1.2) of a given synthetic set at θ = ``net``'s
    current parameters.

    Σ over the classes c present in ``y_syn`` of D(∇_θ CE(net(x_real_c), c), ∇_θ CE(net(x_syn_c), c)),
    with D = :func:`gradient_distance`. Differentiable w.r.t. ``x_syn`` (the synthetic gradients are
    taken with ``create_graph=True``); the real gradients are constants.

    Args:
        x_syn, y_syn: synthetic images ``[n, c, h, w]`` and int64 labels ``[n]``.
        x_real, y_real: the real batch (all its examples of class c are the real class batch).
        net: the classifier θ (all its parameters that require grad are matched).
        bias: 1-D parameters, see :func:`gradient_distance`.
        generator, augment, families: optional Siamese DSA per class (off by default).

    Returns:
        a scalar tensor.
    """
    check_pair(x_syn, y_syn, x_real, y_real)
    if bias not in BIAS_MODES:
        raise ValueError(f"bias: expected one of {BIAS_MODES}, got {bias!r}")
    loss = x_syn.new_zeros(())
    for c in y_syn.unique().tolist():
        xr, xs = x_real[y_real == c], x_syn[y_syn == c]
        if augment:  # one ω for both sides (Siamese)
            xr, xs = siamese_dsa(xr, xs, generator=generator, families=families)
        g_real = [g.detach() for g in class_gradients(net, xr, c, create_graph=False)]
        g_syn = class_gradients(net, xs, c, create_graph=True)
        loss = loss + gradient_distance(g_real, g_syn, bias=bias)
    return loss


class DCDistiller(ImageDistiller):
    """DC on a labelled real set; ``step()`` is one outer iteration (one network, ``outer_loop`` image
    updates with ``inner_loop`` network steps between them).

    Args:
        train: ``(x [N, c, h, w], y [N] int64)`` normalised real images.
        num_classes: C.
        config: :class:`DCConfig`.
        make_model: ``() -> nn.Module`` classifier (default: ``build_model("convnet", c, C, h,
            widths=config.widths, norm=config.norm)``).
    """

    method = "dc"

    def __init__(self, train, num_classes: int, config: DCConfig | None = None,
                 make_model: Callable[[], nn.Module] | None = None, *, process_group=None):
        self.config = cfg = config or DCConfig()
        check_common_config(cfg)
        if cfg.bias not in BIAS_MODES:
            raise ValueError(f"bias: expected one of {BIAS_MODES}, got {cfg.bias!r}")
        for name in ("real_batch", "outer_loop"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(cfg, name)!r}")
        if int(cfg.inner_loop) < 0:
            raise ValueError(f"inner_loop: expected a non-negative integer, got {cfg.inner_loop!r}")
        x, y = train
        self._init_synthetic(x, y, num_classes, process_group)
        self._init_class_sampling(make_model, cfg.widths, cfg.norm)

    def step(self) -> dict:
        cfg = self.config
        net = fresh_network(self.make_model, self.generator, self.x.dtype, self.x.device)
        net.train()
        net_opt = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        losses, net_loss = [], float("nan")
        for t in range(cfg.outer_loop):
            x_real, y_real = self.sample_real()
            loss = dc_loss(self.images, self.labels, x_real, y_real, net, bias=cfg.bias, generator=self.generator,
                           augment=cfg.augment, families=cfg.dsa_families)
            self.image_opt.zero_grad(set_to_none=True)
            (self.images.grad,) = torch.autograd.grad(loss, [self.images])
            self.image_opt.step()
            losses.append(float(loss.detach()))
            if t == cfg.outer_loop - 1:
                break
            x_syn = self.images.detach()
            for _ in range(cfg.inner_loop):
                xb = dsa_augment(x_syn, self.generator, cfg.dsa_families) if cfg.augment else x_syn
                net_opt.zero_grad(set_to_none=True)
                ce = F.cross_entropy(net(xb), self.labels)
                ce.backward()
                net_opt.step()
                net_loss = float(ce.detach())
        return {"loss": sum(losses) / len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                "net_loss": net_loss}
