"""Distributed distillation on ``torch.distributed``: a replicated synthetic set, sharded real data.

Every distiller (LD / LD-RR, KRR-ST, EAD) takes ``process_group=None``. ``None`` is the single-process
run and every helper here is then a no-op, so that path is unchanged. With a group of R ranks:

* the synthetic set (images, labels, targets, the ridge head, optimizer and RNG state) is replicated:
  the same seed everywhere, :meth:`DistContext.broadcast_` from rank 0 at the start, the same
  all-reduced gradient and the same optimizer step on every rank, so it stays bit-identical;
* what scales with the data is sharded with :func:`shard` (contiguous row ranges): each rank computes
  its rows of a loss that is a *sum over real examples* scaled by 1 / (global count), and
  :meth:`DistContext.all_reduce_sum_` sums the partial gradients (one coalesced buffer per dtype);
* :meth:`DistContext.check_consistent` compares a hash of the configuration on all ranks at the start
  and raises the same ``ValueError`` on every rank, naming the rank and the keys that differ;
* checkpoints are written by rank 0 only (atomically, :func:`ddfast.artifacts.save_state`); nothing
  in a checkpoint depends on R, so a run resumes with another world size.

Communication volume: ``DistContext.bytes_all_reduced`` counts the payload bytes handed to
``all_reduce``. A ring all-reduce of B bytes moves 2(R−1)/R · B bytes in and out of each rank.

Launch: ``torchrun --nproc-per-node R ddfast distill ld ... --distributed`` (:func:`init_from_env`:
``gloo`` on CPU, ``nccl`` with CUDA).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist

__all__ = ["DistContext", "shard", "init_from_env", "ring_all_reduce_bytes", "optimizer_state_tensors",
           "ENV_VARS"]

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def shard(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` of ``world`` takes: contiguous, sizes differing by
    at most one (the first ``n % world`` ranks take one more); empty for ranks ≥ n when n < world."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected a positive integer, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an integer in [0, {world}), got {rank!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def ring_all_reduce_bytes(payload_bytes: int, world: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-reduce of ``payload_bytes``: 2(R−1)/R · B."""
    return 2.0 * (world - 1) / world * payload_bytes


def optimizer_state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors (Adam moments and step, SGD momentum) in a rank-independent order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key in sorted(opt.state.get(p, {})):
                v = opt.state[p][key]
                if isinstance(v, torch.Tensor):
                    out.append(v)
    return out


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


class DistContext:
    """Rank, world size and process group of a distiller, with the few collectives it uses.

    Args:
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` or one
            from ``new_group``), or None for a single process (then ``rank = 0``, ``world_size = 1`` and
            every collective returns its input untouched).

    Attributes:
        bytes_all_reduced / all_reduce_calls: payload bytes and calls of :meth:`all_reduce_sum_`
            (the per-step communication volume); bytes_broadcast: payload of :meth:`broadcast_`.
    """

    def __init__(self, process_group=None):
        self.group = process_group
        self.rank, self.world_size = 0, 1
        self.bytes_all_reduced = 0
        self.all_reduce_calls = 0
        self.bytes_broadcast = 0
        if process_group is None:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group: torch.distributed is not initialised; call "
                             "ddfast.distributed.init_from_env() (under torchrun) or torch.distributed.init_process_group")
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of the group")

    def __repr__(self):
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, active={self.active})"

    @property
    def active(self) -> bool:
        """True when a process group was given (even one of size 1)."""
        return self.group is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's rows of ``n`` (:func:`shard`)."""
        return shard(int(n), self.rank, self.world_size)

    # ------------------------------------------------------------------ collectives

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _coalesced(self, tensors, op):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        device = self._device()
        moved = 0
        for group in by_dtype.values():  # insertion order: the same on every rank for the same call
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(device)
            op(flat)
            moved += flat.numel() * flat.element_size()
            offset = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view(t.shape))
                    offset += n
        return moved

    def all_reduce_sum_(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """In place: each tensor becomes its sum over the ranks (one all-reduce per dtype). Returns them."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return tensors
        moved = self._coalesced(tensors, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group))
        self.bytes_all_reduced += moved
        self.all_reduce_calls += len({t.dtype for t in tensors})
        return tensors

    def broadcast_(self, tensors: Iterable[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
        """In place: every rank's tensors become rank ``src``'s (group rank). Same shapes on every rank."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return tensors
        self.bytes_broadcast += self._coalesced(
            tensors, lambda flat: dist.broadcast(flat, group=self.group, group_src=src))
        return tensors

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable ``obj`` on every rank (``torch.distributed.broadcast_object_list``)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, group=self.group, group_src=src)
        return box[0]

    def broadcast_generator_(self, generator: torch.Generator, src: int = 0) -> None:
        """Rank ``src``'s RNG state in ``generator`` on every rank."""
        if not self.active:
            return
        state = generator.get_state()
        self.broadcast_([state], src)
        generator.set_state(state)

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def check_consistent(self, info: Mapping, what: str = "config") -> None:
        """Raise the same ``ValueError`` on every rank unless ``info`` (a nested JSON-able dict: the
        configuration, data shapes, progress counters) is equal on all ranks.

        An all-gather of an 8-byte hash of ``info``; only on a mismatch are the dicts gathered, to name
        the first rank that differs from rank 0 and the keys that differ.
        """
        if not self.active:
            return
        blob = json.dumps(info, sort_keys=True, default=str).encode()
        h = int.from_bytes(hashlib.sha256(blob).digest()[:8], "little", signed=True)
        mine = torch.tensor([h], dtype=torch.int64, device=self._device())
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.group)
        hashes = [int(t.item()) for t in gathered]
        if len(set(hashes)) == 1:
            return
        infos = [None] * self.world_size
        dist.all_gather_object(infos, json.loads(blob), group=self.group)
        bad = next(r for r in range(self.world_size) if hashes[r] != hashes[0])
        a, b = _flatten(infos[0]), _flatten(infos[bad])
        diffs = [f"{k}: rank 0 has {a.get(k)!r}, rank {bad} has {b.get(k)!r}"
                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        raise ValueError(f"{what}: rank {bad} differs from rank 0 ({'; '.join(diffs[:6]) or 'hash mismatch'}); "
                         "every rank must run with the same configuration, data and checkpoint")


def init_from_env(backend: str | None = None, timeout=None):
    """Initialise the default process group from torchrun's environment and return it.

    ``backend``: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA); default ``nccl`` when CUDA is available, else
    ``gloo``. With NCCL the CUDA device is ``LOCAL_RANK``. Raises ``ValueError`` naming the missing
    variables when not launched by torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
    """
    if not dist.is_available():
        raise ValueError("distributed: this torch build has no torch.distributed")
    if dist.is_initialized():
        return dist.group.WORLD
    missing = [k for k in ENV_VARS if k not in os.environ]
    if missing:
        raise ValueError(f"distributed: environment variable(s) {', '.join(missing)} not set; launch with "
                         "`torchrun --nproc-per-node R ddfast distill ... --distributed`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend, **kwargs)
    return dist.group.WORLD
