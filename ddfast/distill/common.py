"""What the image distillers (DM, DC, TM/DATM, SRe2L/DWA) share: the result, the synthetic set, its state.

A distiller subclasses :class:`ImageDistiller` (itself a :class:`ddfast.distill.base.Distiller`, which
owns the fit loop) and implements ``step() -> dict`` (one synthesis iteration; returns at least
``{"loss": float}``) plus ``_extra_state()`` / ``_load_extra_state(state)`` for whatever it owns beyond
the synthetic images, labels, their optimisers and the generator, and ``_replicated_extra()`` for the
live tensors among them that a distributed run broadcasts at the start. ``fit`` runs to
``config.iterations`` with a tqdm bar and atomic checkpoints (``out_dir/checkpoint.safetensors``); a
resumed run continues bit-identically. Synthetic sets start from class-balanced real images
(``init="real"``) or Gaussian noise (``init="noise"``).

``process_group=``: the synthetic set, its optimisers and the generator are replicated (checked and
broadcast from rank 0 at the start), rank 0 alone writes checkpoints and shows progress. DM shards its
real batch over the ranks (:func:`ddfast.distill.dm.dm_loss`); DC, TM/DATM and SRe2L/DWA compute their
step whole on every rank (the same result; no speed-up).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ddfast.data.datasets import balanced_subset
from ddfast.distill.base import Distiller
from ddfast.distributed import optimizer_state_tensors

__all__ = ["ImageDistillResult", "ImageDistiller", "check_train", "check_common_config"]

def check_common_config(cfg, families_field: str | None = "dsa_families") -> None:
    """Validate the fields the image distillers share: ``init`` and the DSA families."""
    from ddfast.augment.dsa import DSA_FAMILIES

    if cfg.init not in ("real", "noise"):
        raise ValueError(f"init: expected 'real' or 'noise', got {cfg.init!r}")
    if families_field is not None:
        families = getattr(cfg, families_field)
        if not families or [f for f in families if f not in DSA_FAMILIES]:
            raise ValueError(f"{families_field}: expected a non-empty subset of {DSA_FAMILIES}, got {families!r}")


@dataclass
class ImageDistillResult:
    images: torch.Tensor
    labels: torch.Tensor  # int64 [N] hard labels, or float [N, C] soft-label logits (DATM)
    init_indices: torch.Tensor
    history: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0


def check_train(x, y, name: str = "train"):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64) or x.dim() != 4:
        raise ValueError(f"{name} x: expected float images [N, c, h, w], got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"{name} y: expected int64 class indices [{x.shape[0]}], got {tuple(getattr(y, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty training set")


class ImageDistiller(Distiller):
    """Base of the image distillers: synthetic ``images`` (ipc per class) and ``labels`` (class-major).

    Subclasses set ``self.config`` (a dataclass with at least ``ipc``, ``iterations``, ``lr_images``,
    ``init``, ``seed``) before calling :meth:`_init_synthetic`.
    """

    method = "image"
    checkpoint_every = 50

    def _init_synthetic(self, x, y, num_classes: int, process_group=None):
        cfg = self.config
        check_train(x, y)
        if int(cfg.ipc) < 1:
            raise ValueError(f"ipc: expected a positive integer, got {cfg.ipc!r}")
        self.x, self.y, self.num_classes = x, y, int(num_classes)
        self._init_run(cfg.seed, process_group)
        self.init_indices = balanced_subset(y, cfg.ipc, seed=cfg.seed, num_classes=self.num_classes)
        if getattr(cfg, "init", "real") == "noise":
            # drawn on the CPU generator (the same noise on every device), then moved to the data's device
            images = torch.randn((self.init_indices.numel(),) + tuple(x.shape[1:]), generator=self.generator,
                                 dtype=x.dtype).to(x.device)
        else:
            images = x[self.init_indices].clone()
        self.images = images.requires_grad_(True)
        self.labels = torch.arange(self.num_classes, device=x.device).repeat_interleave(cfg.ipc)
        self.image_opt = torch.optim.SGD([self.images], lr=cfg.lr_images, momentum=0.5)
        self.iteration = 0

    def _init_class_sampling(self, make_model, widths, norm) -> None:
        """Default network (ConvNet of ``widths``/``norm``) and per-class index lists for :meth:`sample_real`."""
        from ddfast.models import build_model

        c, h = self.x.shape[1], self.x.shape[-1]
        self.make_model = make_model or (lambda: build_model("convnet", c, self.num_classes, h, widths=widths,
                                                             norm=norm))
        self.class_indices = [torch.nonzero(self.y == k).flatten() for k in range(self.num_classes)]

    def sample_real(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``config.real_batch`` random real images of every class (all of a smaller class), class-major."""
        idx = [ix[torch.randperm(ix.numel(), generator=self.generator)[: self.config.real_batch]]
               for ix in self.class_indices]
        idx = torch.cat(idx)
        return self.x[idx], self.y[idx]

    # subclasses -------------------------------------------------------------------------------
    def step(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def result_labels(self) -> torch.Tensor:
        return self.labels.clone()

    # the loop (ddfast.distill.base) -------------------------------------------------------------
    def position(self) -> int:
        return self.iteration

    def total(self) -> int:
        return int(self.config.iterations)

    def advance(self, bar) -> dict:
        rec = self.step()
        self.iteration += 1
        rec = {"iteration": self.iteration, **rec}
        self.history.append(rec)
        self._tick(bar, rec)
        return rec

    def dist_info(self) -> dict:
        return {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
                "data": {"x": list(self.x.shape), "dtype": str(self.x.dtype), "num_classes": self.num_classes},
                "state": {"iteration": self.iteration}}

    def replicated_tensors(self) -> list[torch.Tensor]:
        return [self.images, *optimizer_state_tensors(self.image_opt), *self._replicated_extra()]

    def _replicated_extra(self) -> list[torch.Tensor]:
        """Live tensors a subclass owns beyond the images (learned labels, learning rate, their optimisers)."""
        return []

    def result(self) -> ImageDistillResult:
        return ImageDistillResult(images=self.images.detach().clone(), labels=self.result_labels(),
                                  init_indices=self.init_indices.clone(), history=list(self.history),
                                  iterations=self.iteration, seconds=self.seconds)

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "images": self.images.detach().clone(),
                "image_opt": self.image_opt.state_dict(), "generator": self.generator.get_state(),
                "counters": {"iteration": self.iteration, "seconds": self.seconds},
                "history": json.dumps(self.history), "extra": self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        mine = asdict(self.config)
        for key in ("ipc", "seed", "init"):
            if key in mine and state["config"].get(key) != mine.get(key):
                raise ValueError(f"resume: checkpoint has {key}={state['config'].get(key)!r}, this run {mine.get(key)!r}")
        with torch.no_grad():
            self.images.copy_(state["images"])
        self.image_opt.load_state_dict(state["image_opt"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["counters"]["iteration"])
        self.seconds = float(state["counters"]["seconds"])
        self.history = json.loads(state["history"])
        self._load_extra_state(state.get("extra", {}))
        self._dist_synced = False
