"""Checkpoint-gradient inner products and their gradient w.r.t. a synthetic set (effect-alignment §3.2, §4).

For checkpoints θ_t, a probe batch P, a real batch D_t and a synthetic set S = (s_i, ŷ_i):

    r_t = ⟨v_t, ∇θ L(D_t, θ_t)⟩,   s_t = ⟨v_t, ∇θ L(S, θ_t)⟩,   v_t = ∇θ L(P, θ_t)      (eq. 5)

and ∂s_t/∂s_i, ∂s_t/∂ŷ_i, from which the effect-alignment loss |(1−α) Σ r_t − Σ s_t| (eq. 7) is
differentiated. The fused path never takes a double backward and never holds two checkpoints:

* v_t carries no gradient to S, so it is one plain backward over P.
* s_t is the directional derivative of L(S, ·) along v_t: one forward-mode JVP gives the logits z_i and
  their tangents u_i = J_i v_t, and s_t = (1/|S|) Σ_i (p_i 1ᵀq_i − q_i)ᵀ u_i with p_i = softmax(z_i).
  One backward of that scalar gives ∂s_t/∂s_i; the soft-label gradient is closed form,
  ∂s_t/∂q_i = ((p_i·u_i) 1 − u_i)/|S| (then through the softmax for ``label_mode="logits"``).
* r_t needs no gradient at all: a backward over D_t dotted with v_t (``real_mode="autograd"``), a
  forward-mode JVP along v_t (``"jvp"``), or, for Linear/Conv2d layers, the ghost bilinear form
  Σ_i g_iᵀ V a_i from layer inputs a_i and output gradients g_i without weight-gradient GEMMs
  (``"ghost"``, :mod:`ddfast.ops.ghost_products`).

Checkpoints are consumed one at a time from any iterable (a :class:`ddfast.trajectory.Trajectory`
streams them from disk), so peak memory does not grow with t_m; only the S-sized gradients are kept.

Equivalent PyTorch: ``ddfast.reference.checkpoint_grad_inner.checkpoint_grad_inner_ref``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jvp

from ddfast.network_passes import autocast, check_op_precision
from ddfast import settings
from ddfast.ops._autograd import batch_first, check_finite, first_order_only, may_need_derivative, unwrap_value
from ddfast.reference.checkpoint_grad_inner import (
    _split_state,
    checkpoint_grad_inner_ref,
    effect_alignment_loss,
    real_loss,
    replacement_alpha,
    synthetic_targets,
)

__all__ = [
    "checkpoint_grad_inner",
    "CheckpointGradInnerFunction",
    "effect_alignment_loss",
    "replacement_alpha",
    "REAL_MODES",
    "default_syn_mode",
]

REAL_MODES = ("autograd", "jvp", "ghost")
_FLOATS = (torch.float32, torch.float64)


# --------------------------------------------------------------------------- input checks


def _check_labels(name, y, n, num_classes=None):
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(y).__name__}")
    if y.dtype in (torch.int64, torch.int32):
        if y.shape != (n,):
            raise ValueError(f"{name}: expected class indices of shape [{n}], got {tuple(y.shape)}")
    elif y.dtype in _FLOATS:
        if y.dim() != 2 or y.shape[0] != n:
            raise ValueError(f"{name}: expected soft labels of shape [{n}, C], got {tuple(y.shape)}")
    else:
        raise TypeError(f"{name}: expected int64 class indices or float soft labels, got {y.dtype}")


def _check_batch(name, batch, like):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"{name}: expected a pair (images, labels)")
    x, y = batch
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{name}: images must be a float32/float64 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.device != like.device:
        raise ValueError(f"{name}: expected images on {like.device} (the synthetic images' device), got {x.device}")
    if x.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{name}: images of shape [N, {', '.join(map(str, like.shape[1:]))}] expected (the synthetic images' "
            f"per-example shape), got {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    _check_labels(f"{name} labels", y, x.shape[0])


def _check_inputs(model, probe, real, images, soft_labels, label_mode, real_mode, enabled=None):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dtype not in _FLOATS:
        raise TypeError(f"images: expected a float32/float64 tensor, got {getattr(images, 'dtype', type(images))}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty batch [|S|, ...], got {tuple(images.shape)}")
    if not isinstance(soft_labels, torch.Tensor) or soft_labels.dtype != images.dtype:
        raise TypeError(f"soft_labels: expected a {images.dtype} tensor (the images' dtype), got "
                        f"{getattr(soft_labels, 'dtype', type(soft_labels))}")
    if soft_labels.dim() != 2 or soft_labels.shape[0] != images.shape[0]:
        raise ValueError(f"soft_labels: expected shape [{images.shape[0]}, C], got {tuple(soft_labels.shape)}")
    if label_mode not in ("logits", "probs"):
        raise ValueError(f"label_mode: expected 'logits' or 'probs', got {label_mode!r}")
    if real_mode not in REAL_MODES + ("auto",):
        raise ValueError(f"real_mode: expected one of {('auto',) + REAL_MODES}, got {real_mode!r}")
    _check_batch("probe", probe, images)
    if real is not None:
        _check_batch("real", real, images)
    if soft_labels.device != images.device:
        raise ValueError(f"soft_labels: expected device {images.device} (the images' device), got {soft_labels.device}")
    named = {"images": images, "soft_labels": soft_labels, "probe images": probe[0], "probe labels": probe[1]}
    if real is not None:
        named.update({"real images": real[0], "real labels": real[1]})
    check_finite("checkpoint_grad_inner", {k: t for k, t in named.items() if t.is_floating_point()}, enabled)
    _check_label_range({k: t for k, t in named.items() if not t.is_floating_point()}, soft_labels.shape[1], enabled)


def _check_label_range(named, C, enabled):
    """Class indices of the probe / real batches: ≥ 0, and < C (the soft labels' width, which must cover
    every class the real data uses)."""
    if enabled is False or (enabled is None and not settings.check_finite) or torch.compiler.is_compiling():
        return
    for k, y in named.items():
        if y.device.type == "meta" or y.numel() == 0:
            continue
        lo, hi = (int(v) for v in torch.stack([unwrap_value(y).min(), unwrap_value(y).max()]).tolist())
        if lo < 0:
            raise ValueError(f"{k}: class indices must be ≥ 0, got {lo}; pass check_finite=False to skip this check")
        if hi >= C:
            raise ValueError(f"soft_labels: expected {hi + 1} columns or more ({k} hold class index {hi}), got {C}")


class _CheckedCheckpoints:
    """The checkpoints, each state's parameters checked for NaN / Inf (named) as it is consumed; re-iterable
    exactly when the underlying iterable is."""

    def __init__(self, checkpoints, model, enabled):
        self.checkpoints, self.enabled = checkpoints, enabled
        self.names = [k for k, p in model.named_parameters()]

    @property
    def one_shot(self):
        return iter(self.checkpoints) is self.checkpoints

    def __iter__(self):
        for i, state in enumerate(self.checkpoints):
            if isinstance(state, Mapping):
                check_finite("checkpoint_grad_inner", {f"checkpoints[{i}][{k!r}]": state[k] for k in self.names
                                                       if isinstance(state.get(k), torch.Tensor)}, self.enabled)
            yield state


def _check_model_mode(model):
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            raise ValueError(
                f"model: BatchNorm {name!r} is in training mode and would update its running statistics "
                "inside the forward-mode pass; call model.eval() (the checkpoints' running statistics are "
                "used) or use a norm without running statistics"
            )


# --------------------------------------------------------------------------- fused algorithm


def _forward(model, state, x, precision):
    """The network pass f(x; state), under bf16 autocast for ``precision="bf16"``; outputs in x's dtype."""
    with autocast(precision, x.device):
        out = functional_call(model, state, (x,))
    return out.to(x.dtype)


def _chunks(x, y, chunk):
    n = x.shape[0]
    step = n if not chunk or chunk >= n else int(chunk)
    for s in range(0, n, step):
        yield x[s : s + step], y[s : s + step], min(step, n - s) / n


def _mean_grad(model, leaves, buffers, x, y, chunk, precision="fp32"):
    """∇θ L(x, y) with L the batch mean, streaming the batch in chunks."""
    plist = list(leaves.values())
    total = None
    for xc, yc, w in _chunks(x, y, chunk):
        loss = real_loss(_forward(model, {**leaves, **buffers}, xc, precision), yc) * w
        g = torch.autograd.grad(loss, plist)
        total = list(g) if total is None else [a + b for a, b in zip(total, g)]
    return total


def _real_inner_autograd(model, leaves, buffers, v, x, y, chunk, precision="fp32"):
    g = _mean_grad(model, leaves, buffers, x, y, chunk, precision)
    return sum((a * b).sum() for a, b in zip(v, g))


def _real_inner_jvp(model, theta, buffers, vdict, x, y, chunk, precision="fp32"):
    total = 0.0
    with torch.no_grad():
        for xc, yc, w in _chunks(x, y, chunk):
            _, d = jvp(lambda th: real_loss(_forward(model, {**th, **buffers}, xc, precision), yc), (theta,), (vdict,))
            total = total + d * w
    return total


def _real_inner_ghost(model, leaves, buffers, vdict, x, y, chunk, backend):
    from ddfast.ops import ghost_products as gp

    total = 0.0
    for xc, yc, w in _chunks(x, y, chunk):
        total = total + gp.grad_dot(model, {**leaves, **buffers}, vdict, xc, yc, real_loss, backend=backend) * w
    return total


def _synthetic_pass(model, theta, buffers, vdict, images, soft_labels, label_mode, need_x, need_y, precision="fp32"):
    """s = ⟨v, ∇θ L(S, θ)⟩ and its gradients w.r.t. images and soft labels (reverse-over-forward)."""
    n = images.shape[0]
    q = synthetic_targets(soft_labels.detach(), label_mode)
    x = images.detach().requires_grad_(need_x)
    with torch.set_grad_enabled(need_x):
        z, u = jvp(lambda th: _forward(model, {**th, **buffers}, x, precision), (theta,), (vdict,))
        if z.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"soft_labels: expected {z.shape[-1]} columns (the model's output width), got {q.shape[-1]}"
            )
        p = torch.softmax(z, dim=-1)
        coeff = p * q.sum(-1, keepdim=True) - q
        s = (coeff * u).sum() / n
        gx = torch.autograd.grad(s, x)[0] if need_x else None
    gy = None
    if need_y:
        p, u = p.detach(), u.detach()
        gq = ((p * u).sum(-1, keepdim=True) - u) / n
        gy = q * (gq - (q * gq).sum(-1, keepdim=True)) if label_mode == "logits" else gq
    return s.detach(), gx, gy


def _synthetic_pass_double(model, leaves, buffers, v, images, soft_labels, label_mode, need_x, need_y,
                           precision="fp32"):
    """The same s and gradients by differentiating ⟨v, ∇θ L(S, θ)⟩ with a double backward, one checkpoint
    at a time (``syn_mode="double"``; faster than the JVP for models whose norm layers have costly
    forward-mode formulas)."""
    from ddfast.reference.checkpoint_grad_inner import synthetic_loss

    x = images.detach().requires_grad_(need_x)
    y = soft_labels.detach().requires_grad_(need_y)
    plist = list(leaves.values())
    with torch.enable_grad():
        z = _forward(model, {**leaves, **buffers}, x, precision)
        if z.shape[-1] != y.shape[-1]:
            raise ValueError(
                f"soft_labels: expected {z.shape[-1]} columns (the model's output width), got {y.shape[-1]}"
            )
        g = torch.autograd.grad(synthetic_loss(z, y, label_mode), plist, create_graph=need_x or need_y)
        s = sum((a * b).sum() for a, b in zip(v, g))
        wrt = [t for t, need in ((x, need_x), (y, need_y)) if need]
        grads = list(torch.autograd.grad(s, wrt)) if wrt else []
    gx = grads.pop(0) if need_x else None
    gy = grads.pop(0) if need_y else None
    return s.detach(), gx, gy


class _Runner:
    def __init__(self, model, checkpoints, probe, real, label_mode, real_mode, syn_mode, chunk, backend,
                 precision="fp32"):
        self.model, self.checkpoints, self.probe, self.real = model, checkpoints, probe, real
        self.precision = precision
        self.label_mode, self.real_mode, self.chunk, self.backend = label_mode, real_mode, chunk, backend
        self.syn_mode = syn_mode

    def run(self, images, soft_labels, need_x, need_y, reduce):
        model, (x_p, y_p) = self.model, self.probe
        r_all, s_all, gx_all, gy_all = [], [], [], []
        gx_sum = gy_sum = None
        for state in self.checkpoints:
            params, buffers = _split_state(model, state)
            theta = {k: t.detach() for k, t in params.items()}
            with torch.enable_grad():
                leaves = {k: t.detach().requires_grad_(True) for k, t in params.items()}
                v = _mean_grad(model, leaves, buffers, x_p, y_p, self.chunk, self.precision)
                vdict = dict(zip(leaves, v))
                if self.real is None:
                    r = images.new_zeros(())
                elif self.real_mode == "autograd":
                    r = _real_inner_autograd(model, leaves, buffers, v, *self.real, self.chunk, self.precision)
                elif self.real_mode == "jvp":
                    r = _real_inner_jvp(model, theta, buffers, vdict, *self.real, self.chunk, self.precision)
                else:
                    r = _real_inner_ghost(model, leaves, buffers, vdict, *self.real, self.chunk, self.backend)
            if self.syn_mode == "double":
                s, gx, gy = _synthetic_pass_double(model, leaves, buffers, v, images, soft_labels, self.label_mode,
                                                   need_x, need_y, self.precision)
            else:
                s, gx, gy = _synthetic_pass(model, theta, buffers, vdict, images, soft_labels, self.label_mode,
                                            need_x, need_y, self.precision)
            r_all.append(torch.as_tensor(r, dtype=images.dtype).detach().reshape(()))
            s_all.append(s)
            if reduce == "none":
                gx_all.append(gx)
                gy_all.append(gy)
            else:
                if gx is not None:
                    gx_sum = gx if gx_sum is None else gx_sum + gx
                if gy is not None:
                    gy_sum = gy if gy_sum is None else gy_sum + gy
        if not s_all:
            raise ValueError("checkpoints: expected at least one checkpoint, got none")
        r, s = torch.stack(r_all), torch.stack(s_all)
        if reduce == "none":
            gx = torch.stack(gx_all) if need_x else None
            gy = torch.stack(gy_all) if need_y else None
            return r, s, gx, gy
        return r.sum(), s.sum(), gx_sum, gy_sum


_FWD_AD_COSTLY = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def default_syn_mode(model: nn.Module) -> str:
    """``"double"`` when the model has GroupNorm / LayerNorm / InstanceNorm layers (their forward-mode
    formulas cost several elementwise passes; measured slower than the double backward on CPU), else
    ``"jvp"``."""
    return "double" if any(isinstance(m, _FWD_AD_COSTLY) for m in model.modules()) else "jvp"


_SECOND_ORDER = (
    "checkpoint_grad_inner: the fused path is first order (the S-gradients are computed with s in the forward); "
    "second derivatives w.r.t. images / soft_labels (create_graph=True then another backward, torch.func.hessian, "
    "jacrev(jacrev(f)), jacfwd(jacfwd(f))) are not supported. Use backend=\"reference\" (a double backward per "
    "checkpoint, differentiable again)"
)


class CheckpointGradInnerFunction(torch.autograd.Function):
    """``(r, s)`` with the S-gradients computed in the forward pass, streamed over checkpoints.

    ``reduce="sum"`` returns scalars Σ_t r_t, Σ_t s_t and keeps one S-sized gradient; ``"none"``
    returns ``[t_m]`` vectors and keeps t_m of them. ``r`` is not differentiable (it does not depend
    on S). Backward: ∂/∂S = Σ_t grad_s[t] ∂s_t/∂S; forward mode: s_t' = ⟨∂s_t/∂images, images'⟩ +
    ⟨∂s_t/∂soft_labels, soft_labels'⟩ (both exact to first order; a second derivative raises
    :class:`ddfast.errors.HigherOrderUnsupportedError`). ``vmap`` over synthetic sets runs the op once per set
    (re-iterable checkpoints only). ``needs``: which S-gradients to compute (default both). Outputs
    3 and 4 are those gradients (not differentiable; None when not computed).
    """

    @staticmethod
    def forward(images, soft_labels, runner, reduce, needs=(True, True)):
        return runner.run(images, soft_labels, needs[0], needs[1], reduce)

    @staticmethod
    def setup_context(ctx, inputs, output):
        images, soft_labels, _runner, reduce = inputs[:4]
        r, _s, gx, gy = output
        ctx.mark_non_differentiable(*(t for t in (r, gx, gy) if t is not None))
        ctx.save_for_backward(gx, gy, images, soft_labels)
        ctx.save_for_forward(gx, gy, images, soft_labels)
        ctx.reduce = reduce

    @staticmethod
    def backward(ctx, grad_r, grad_s, _grad_gx, _grad_gy):
        gx, gy, images, soft_labels = ctx.saved_tensors
        if grad_s is None:
            return None, None, None, None, None

        def apply(g, i):
            if g is None or not ctx.needs_input_grad[i]:
                return None
            out = torch.tensordot(grad_s.to(g.dtype), g, dims=1) if ctx.reduce == "none" else grad_s.to(g.dtype) * g
            return first_order_only(out, (images, soft_labels, grad_s), _SECOND_ORDER)

        return apply(gx, 0), apply(gy, 1), None, None, None

    @staticmethod
    def jvp(ctx, images_t, soft_labels_t, *_):
        gx, gy, images, soft_labels = ctx.saved_tensors
        s_t = None
        for g, t in ((gx, images_t), (gy, soft_labels_t)):
            if t is None:
                continue
            if g is None:  # pragma: no cover - needs are derived from the same tangents
                raise RuntimeError("checkpoint_grad_inner: a tangent reached an input whose gradient was not computed")
            g = first_order_only(g, (images, soft_labels), _SECOND_ORDER, always=True)
            term = (g * t).flatten(1).sum(1) if ctx.reduce == "none" else (g * t).sum()
            s_t = term if s_t is None else s_t + term
        return None, s_t, None, None

    @staticmethod
    def vmap(info, in_dims, images, soft_labels, runner, reduce, needs=(True, True)):
        if runner.checkpoints.one_shot:
            raise ValueError(
                "checkpoints: torch.func.vmap over checkpoint_grad_inner evaluates every checkpoint once per "
                "synthetic set, so it needs re-iterable checkpoints (a list or a Trajectory), not a one-shot iterator"
            )
        B = info.batch_size
        xs, ys = batch_first(images, in_dims[0], B), batch_first(soft_labels, in_dims[1], B)
        outs = [CheckpointGradInnerFunction.apply(xs[b], ys[b], runner, reduce, needs) for b in range(B)]
        stacked = tuple(None if o[0] is None else torch.stack(o) for o in zip(*outs))
        return stacked, tuple(None if t is None else 0 for t in stacked)


def checkpoint_grad_inner(
    model: nn.Module,
    checkpoints: Iterable[Mapping[str, torch.Tensor]],
    probe: tuple[torch.Tensor, torch.Tensor],
    real: tuple[torch.Tensor, torch.Tensor] | None,
    images: torch.Tensor,
    soft_labels: torch.Tensor,
    *,
    label_mode: str = "logits",
    reduce: str = "sum",
    real_mode: str = "auto",
    syn_mode: str = "auto",
    chunk: int | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    check_finite: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_t ⟨∇L(P,θ_t), ∇L(D_t,θ_t)⟩ and Σ_t ⟨∇L(P,θ_t), ∇L(S,θ_t)⟩, the second differentiable w.r.t. S.

    Args:
        model: the network whose parameters (and buffers, when the state has them) are replaced by each
            checkpoint's. Models with BatchNorm must be in eval mode on the fused path.
        checkpoints: iterable of state dicts θ_t, consumed once and one at a time.
        probe: (x_P, y_P), labels as class indices ``[N]`` or soft rows ``[N, C]``.
        real: (x_D, y_D) or None (then r = 0).
        images: synthetic images ``[|S|, ...]`` (float32/float64).
        soft_labels: ``[|S|, C]``; targets q = softmax(ŷ) (``label_mode="logits"``) or ŷ (``"probs"``).
        reduce: ``"sum"`` (scalars) or ``"none"`` (``[t_m]`` per checkpoint).
        real_mode: how r_t is computed on the fused path: ``"autograd"`` (backward + dot; default),
            ``"jvp"`` or ``"ghost"`` (see the module docstring).
        syn_mode: how s_t and its S-gradient are computed on the fused path: ``"jvp"`` (forward-mode
            JVP + one backward, closed-form label gradient) or ``"double"`` (double backward of the one
            checkpoint's ⟨v_t, ∇L(S)⟩, graph freed before the next checkpoint); ``"auto"``: see
            :func:`default_syn_mode`.
        chunk: process P and D_t in chunks of this many examples (bounds activation memory).
        precision: ``"fp32"`` or ``"bf16"`` (fused path only): every network pass (P, D_t, S) under bf16
            autocast with logits cast back to the images' dtype (``real_mode="ghost"`` computes the D_t
            term in float32); the inner products, the losses and the S-gradients are float32
            (:mod:`ddfast.network_passes`).
        backend: ``"reference"`` (double backward, :func:`checkpoint_grad_inner_ref`) or a fused
            backend name (``"auto"``, ``"fused"``, ``"cpu"``, ``"triton"``, ``"cuda"``; the name selects
            the ghost-product kernels of ``real_mode="ghost"``).
        check_finite: raise ``ValueError`` naming the argument when the images, soft labels, probe / real
            batches or a checkpoint's parameters hold NaN / Inf, or integer labels fall outside ``[0, C)``;
            one host sync per check (per checkpoint for the parameters). ``None`` reads
            ``ddfast.settings.check_finite`` (default True); ``False`` skips the checks.

    Returns:
        ``(r, s)``: scalars (``reduce="sum"``) or ``[t_m]`` vectors; ``s`` is differentiable w.r.t.
        ``images`` and ``soft_labels``, ``r`` is not.

    Autograd: the fused path is first order (backward, and ``torch.func`` ``grad`` / ``jacrev`` / ``jacfwd`` /
    ``jvp`` / ``vmap`` over synthetic sets); a second derivative raises
    :class:`ddfast.errors.HigherOrderUnsupportedError`. The reference path is differentiable again.

    Equivalent PyTorch: ``ddfast.reference.checkpoint_grad_inner.checkpoint_grad_inner_ref``.
    """
    if reduce not in ("sum", "none"):
        raise ValueError(f"reduce: expected 'sum' or 'none', got {reduce!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"chunk: expected None or a positive number of examples, got {chunk!r}")
    if syn_mode not in ("auto", "jvp", "double"):
        raise ValueError(f"syn_mode: expected 'auto', 'jvp' or 'double', got {syn_mode!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name, got {type(backend).__name__}")
    if isinstance(checkpoints, Mapping) or not isinstance(checkpoints, Iterable):
        raise TypeError("checkpoints: expected an iterable of state dicts (a list, a generator or a Trajectory), got "
                        f"{type(checkpoints).__name__}")
    _check_inputs(model, probe, real, images, soft_labels, label_mode, real_mode, check_finite)
    if images.device.type == "meta":
        raise ValueError("images: checkpoint_grad_inner evaluates the model at every checkpoint and cannot run on "
                         "meta tensors")
    check_op_precision(precision, backend == "reference")
    checkpoints = _CheckedCheckpoints(checkpoints, model, check_finite)
    if backend == "reference":
        r, s = checkpoint_grad_inner_ref(model, checkpoints, probe, real, images, soft_labels, label_mode)
        return (r.sum(), s.sum()) if reduce == "sum" else (r, s)
    _check_model_mode(model)
    mode = "autograd" if real_mode == "auto" else real_mode
    smode = default_syn_mode(model) if syn_mode == "auto" else syn_mode
    runner = _Runner(model, checkpoints, probe, real, label_mode, mode, smode, chunk, backend, precision)
    needs = (may_need_derivative(images), may_need_derivative(soft_labels))
    return CheckpointGradInnerFunction.apply(images, soft_labels, runner, reduce, needs)[:2]
