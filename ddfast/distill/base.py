"""The fit loop every distiller shares: progress, atomic checkpoints, bit-identical resume, distributed start.

A distiller subclasses :class:`Distiller` and defines its step and its state; the loop lives here once:

* ``step()`` — one unit of the method (an iteration, a meta-step) returning a record ``{"loss": ..., ...}``;
  or, when a checkpoint unit spans several steps (LD: an epoch of meta-iterations), ``advance(bar)``;
* ``position()`` / ``total()`` — completed and wanted checkpoint units (``fit`` runs until they meet);
* ``state_dict()`` / ``load_state_dict(state)`` — everything a resumed run needs (RNG and optimiser
  state included), so that it continues bit-identically;
* ``setup(bar)`` — work done once before the first unit (KRR-ST's model pool); returns True when it
  changed the state worth a checkpoint;
* ``postfix(record)`` — what the progress bar shows;
* ``dist_info()`` / ``replicated_tensors()`` — for ``process_group=`` runs: what must agree on every rank
  (:meth:`ddfast.distributed.DistContext.check_consistent`) and the live tensors broadcast from rank 0
  at the start (the generator is broadcast too).

:meth:`Distiller.fit` then: loads ``out_dir/checkpoint.safetensors`` when ``resume``; checks and
broadcasts the replicated state once (again after a resume); runs the units with a tqdm bar (rank 0
only); times them into ``self.seconds``; calls ``callback(self, record)`` after each unit (every rank);
writes the checkpoint atomically every ``checkpoint_every`` units and at the end (rank 0 only; nothing in
a checkpoint depends on the number of ranks, so a run may resume with another R); returns ``result()``.
"""

from __future__ import annotations

import os
import time

import torch

from ddfast.artifacts import load_state, save_state
from ddfast.distributed import DistContext

__all__ = ["Distiller", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"


class Distiller:
    """Base of every distiller: the loop once, each method a subclass (see the module docstring).

    Subclasses call :meth:`_init_run` in their constructor (generator, history, timing, distributed
    context) and set the attributes their hooks read.
    """

    method = "distill"  # progress-bar label
    unit = "it"  # progress-bar unit
    checkpoint_every = 50  # default units between checkpoints

    # ------------------------------------------------------------------ construction

    def _init_run(self, seed: int, process_group=None) -> None:
        """The state every run owns: ``generator`` (seeded), ``history``, ``seconds`` and ``dist``."""
        self.dist = DistContext(process_group)
        self._dist_synced = False
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history: list[dict] = []
        self.seconds = 0.0

    # ------------------------------------------------------------------ hooks

    def step(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def position(self) -> int:  # pragma: no cover - abstract
        """Completed checkpoint units."""
        raise NotImplementedError

    def total(self) -> int:  # pragma: no cover - abstract
        """Checkpoint units of the whole run."""
        raise NotImplementedError

    def bar_counts(self) -> tuple[int, int]:
        """``(total, done)`` of the progress bar (default: the checkpoint units)."""
        return self.total(), self.position()

    def setup(self, bar) -> bool:
        """Once per ``fit`` before the first unit; True when it changed the state (a checkpoint follows)."""
        return False

    def advance(self, bar) -> dict:
        """One checkpoint unit: by default one :meth:`step`, shown on ``bar``."""
        record = self.step()
        self._tick(bar, record)
        return record

    def postfix(self, record: dict) -> dict:
        """The progress bar's postfix for ``record``."""
        return {"loss": f"{record['loss']:.4g}"} if record and "loss" in record else {}

    def dist_info(self) -> dict:
        """What must be equal on every rank at the start (configuration, data shapes, progress)."""
        return {}

    def replicated_tensors(self) -> list[torch.Tensor]:
        """Live tensors broadcast from rank 0 at the start (synthetic set, optimiser state, models)."""
        return []

    def state_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def result(self):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def _tick(self, bar, record: dict | None, n: int = 1) -> None:
        if bar is not None:
            bar.update(n)
            post = self.postfix(record) if record is not None else {}
            if post:
                bar.set_postfix(post, refresh=False)

    def _dist_start(self) -> None:
        """Once per run (again after a resume): every rank checks that it has the same configuration,
        data and progress, then takes rank 0's replicated state and generator."""
        if not self.dist.active or self._dist_synced:
            return
        self.dist.check_consistent(self.dist_info())
        self.dist.broadcast_([t.detach() for t in self.replicated_tensors()])
        self.dist.broadcast_generator_(self.generator)
        self._dist_synced = True

    def checkpoint_path(self, out_dir: str | None) -> str | None:
        return os.path.join(out_dir, CHECKPOINT_NAME) if out_dir else None

    def save_checkpoint(self, path: str) -> None:
        """Atomic write of :meth:`state_dict` (rank 0 only)."""
        if self.dist.is_main:
            save_state(path, self.state_dict())

    def resume_from(self, path: str) -> None:
        self.load_state_dict(load_state(path))
        self._dist_synced = False

    def fit(self, out_dir: str | None = None, resume: bool = False, progress: bool = False,
            checkpoint_every: int | None = None, callback=None):
        """Run (or, with ``resume``, continue) until :meth:`total` units; returns :meth:`result`.

        Args:
            out_dir: where ``checkpoint.safetensors`` is written atomically (None: no checkpoints).
            resume: continue from ``out_dir``'s checkpoint when there is one (bit-identical).
            progress: a tqdm bar (rank 0).
            checkpoint_every: units between checkpoints (default :attr:`checkpoint_every`); one is
                always written after the last unit.
            callback: ``callback(distiller, record)`` after every unit (every rank).
        """
        every = int(checkpoint_every or self.checkpoint_every)
        if every < 1:
            raise ValueError(f"checkpoint_every: expected a positive integer, got {checkpoint_every!r}")
        ckpt = self.checkpoint_path(out_dir)
        if resume and ckpt and os.path.exists(ckpt):
            self.resume_from(ckpt)
        self._dist_start()
        bar = None
        if progress and self.dist.is_main:
            from tqdm.auto import tqdm

            total, done = self.bar_counts()
            bar = tqdm(total=total, initial=done, desc=self.method, unit=self.unit, dynamic_ncols=True)
        try:
            t0 = time.perf_counter()
            changed = self.setup(bar)
            self.seconds += time.perf_counter() - t0
            if changed and ckpt:
                self.save_checkpoint(ckpt)
            while self.position() < self.total():
                t0 = time.perf_counter()
                record = self.advance(bar)
                self.seconds += time.perf_counter() - t0
                if callback is not None:
                    callback(self, record)
                done = self.position()
                if ckpt and (done % every == 0 or done >= self.total()):
                    self.save_checkpoint(ckpt)
        finally:
            if bar is not None:
                bar.close()
        result = self.result()
        if out_dir and self.dist.is_main:  # the artifacts the CLI writes (ddfast.runs.write_run_artifacts)
            from ddfast.runs import write_run_artifacts

            write_run_artifacts(out_dir, self, result)
        return result
