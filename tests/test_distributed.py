"""Distributed distillation (:mod:`ddfast.distributed`): R = 2 gloo processes against one process.

Each test spawns its own two CPU processes (FileStore rendezvous, one thread each). Checked for LD-RR
(and second-order LD), KRR-ST, EAD and DM (Siamese DSA on, the real batch of every class sharded): R = 2 on a global batch B gives the same synthetic-set updates
as R = 1 on B (float64, over 3–6 steps) and keeps the replicas bit-identical; a rank dying mid-run
leaves the last checkpoint intact and a single process resumes it to the uninterrupted result;
mismatched configurations raise a clear error on every rank at the start.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddfast.artifacts import load_state
from ddfast.data.datasets import ImageDataset
from ddfast.distill.dm import DMConfig, DMDistiller
from ddfast.distill.ead import EADConfig, EffectAlignmentDistiller
from ddfast.distill.krr_st import KRRSTConfig, KRRSTDistiller
from ddfast.distill.ld import LDConfig, LabelDistiller
from ddfast.distributed import DistContext, ring_all_reduce_bytes, shard
from ddfast.models.mlp import MLP
from ddfast.trajectory import Trajectory, train_trajectory

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
# float64 throughout; R = 2 sums per-rank partial sums, so results agree to rounding, not bit for bit.
TOL = dict(rtol=1e-9, atol=1e-11)
LD_CFG = dict(model="mlp", outer_batch=33, epochs=2, val_every=1, stats_gap=2, seed=3)
KRR_CFG = dict(m=12, steps=4, batch_size=41, pool_size=3, pool_steps=4, widths=(4, 8), seed=1)
EAD_CFG = dict(ipc=2, iterations=3, t_m=3, syn_batch=7, probe_batch=32, real_batch=33, seed=2)
DM_CFG = dict(ipc=2, iterations=3, real_batch=7, widths=(4, 8), seed=5)  # 7 per class: shards of 4 and 3


# --------------------------------------------------------------------------- data (deterministic, tiny)


def _images(n, seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _ld(variant="rr", group=None, **kw):
    x, y = _images(80, 0)
    xv, yv = _images(30, 1)
    torch.manual_seed(0)
    return LabelDistiller(x[[0, 1, 2, 3, 4, 5, 6, 7]], (x, y), (xv, yv), 4,
                          LDConfig(variant=variant, **{**LD_CFG, **kw}),
                          make_model=lambda: MLP(1, 4, 8, hidden=(16,)), process_group=group)


def _krr(group=None, **kw):
    x, _ = _images(90, 4)
    t = torch.randn(90, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return KRRSTDistiller(x, config=KRRSTConfig(**{**KRR_CFG, **kw}), train_targets=t, process_group=group)


def _dm(group=None, **kw):
    x, y = _images(80, 8)
    return DMDistiller((x, y), 4, DMConfig(**{**DM_CFG, **kw}), process_group=group)


def _dataset():
    x, y = _images(120, 6)
    xt, yt = _images(20, 7)
    return ImageDataset("random", x.float(), y, x[:0].float(), y[:0], xt.float(), yt, 4, 1, 8, (0.0,), (1.0,))


def _ead(traj_dir, group=None, **kw):
    data = _dataset()
    return EffectAlignmentDistiller(Trajectory.open(traj_dir), (data.train_x.double(), data.train_y),
                                    EADConfig(**{**EAD_CFG, **kw}), process_group=group)


def _make_trajectory(out, group=None):
    return train_trajectory(_dataset(), "mlp", out, epochs=2, every=2, lr=0.1, batch_size=32,
                            model_options={"hidden": (8,)}, progress=False, process_group=group)


def _ld_state(d):
    return {"labels": d.labels.detach().clone(), "best_labels": d.best_labels.clone(), "errors": list(d.window),
            "resets": d.resets, "iteration": d.iteration, "val": [h["val_accuracy"] for h in d.history],
            "model": {k: v.clone() for k, v in d.model.state_dict().items()}, "bytes": d.dist.bytes_all_reduced}


def _krr_state(d):
    return {"images": d.images.detach().clone(), "targets": d.targets.detach().clone(),
            "losses": [h["loss"] for h in d.history], "pool": [m.state_dict() for m in d.pool.models],
            "bytes": d.dist.bytes_all_reduced}


def _dm_state(d):
    return {"images": d.images.detach().clone(), "losses": [h["loss"] for h in d.history],
            "bytes": d.dist.bytes_all_reduced}


def _ead_state(d):
    return {"images": d.images.detach().clone(), "labels": d.labels.detach().clone(),
            "losses": [h["loss"] for h in d.history], "checkpoints": [h["checkpoints"] for h in d.history],
            "bytes": d.dist.bytes_all_reduced}


# --------------------------------------------------------------------------- spawned workers


def _worker(rank, world, init_file, out, job, arg):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    group = dist.group.WORLD
    result = JOBS[job](rank, group, out, arg)
    torch.save(result, os.path.join(out, f"{job}-rank{rank}.pt"))
    dist.destroy_process_group()


def _job_equivalence(rank, group, out, traj_dir):
    res = {}
    # Trajectory training with DistributedDataParallel: rank 0 writes, every rank returns it.
    traj = _make_trajectory(os.path.join(out, "trajectory"), group)
    res["trajectory"] = {"final": dict(traj.final()), "losses": [c["train_loss"] for c in traj.index["checkpoints"]],
                         "steps": list(traj.steps)}
    for variant in ("rr", "second_order"):
        d = _ld(variant, group)
        d.fit()
        res[f"ld-{variant}"] = _ld_state(d)
    d = _krr(group)
    d.fit()
    res["krr"] = _krr_state(d)
    d = _dm(group)
    d.fit()
    res["dm"] = _dm_state(d)
    for name, kw in (("ead", {}), ("ead-tm1", {"t_m": 1, "syn_batch": None})):
        d = _ead(traj_dir, group, **kw)
        d.fit()
        res[name] = _ead_state(d)
    # Mismatched configurations: every rank raises at the start, naming the rank and the key.
    errors = {}
    for name, make in (("ld", lambda: _ld("rr", group, outer_batch=33 + rank)),
                       ("krr", lambda: _krr(group, lam=1e-6 * (1 + rank)))):
        try:
            make().fit()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    res["errors"] = errors
    return res


PROGRESS = {"ld": lambda s: s["counters"]["epoch"], "krr": lambda s: s["step_count"],
            "ead": lambda s: s["counters"]["iteration"]}


def _die_at(obj, method, counter, k, rank, ckpt, progress):
    """Rank 1 exits (no cleanup) when ``method`` is entered with ``counter == k``, once rank 0 has written
    checkpoint k; rank 0 is then stuck in the next collective and is torn down with it."""
    original = getattr(obj, method)

    def wrapped(*args, **kwargs):
        if rank == 1 and getattr(obj, counter) == k:
            for _ in range(400):
                try:
                    if progress(load_state(ckpt)) == k:
                        break
                except (FileNotFoundError, ValueError, OSError):
                    pass
                time.sleep(0.025)
            os._exit(3)
        return original(*args, **kwargs)

    setattr(obj, method, wrapped)


def _job_die(rank, group, out, which):
    kind, traj_dir = which
    run = os.path.join(out, "run")
    ckpt = os.path.join(run, "checkpoint.safetensors")
    if kind == "ld":
        d = _ld("rr", group)
        _die_at(d, "run_epoch", "epoch", 1, rank, ckpt, PROGRESS[kind])
    elif kind == "krr":
        d = _krr(group)
        _die_at(d, "step", "step_count", 2, rank, ckpt, PROGRESS[kind])
    else:
        d = _ead(traj_dir, group)
        _die_at(d, "step", "iteration", 2, rank, ckpt, PROGRESS[kind])
    d.fit(out_dir=run, checkpoint_every=1)
    return {}


JOBS = {"equivalence": _job_equivalence, "die": _job_die}


def _launch(runs: dict, deadline: float = 300.0) -> dict:
    """Start every run ``{name: (folder, job, arg)}`` as its own group of WORLD processes, all at once (the
    processes' start-up dominates on a small machine), wait for all; ``{name: [exit code per rank]}``."""
    ctx = mp.get_context("spawn")
    procs = {}
    for name, (out, job, arg) in runs.items():
        init = os.path.join(out, "store")
        procs[name] = [ctx.Process(target=_worker, args=(r, WORLD, init, out, job, arg)) for r in range(WORLD)]
        for p in procs[name]:
            p.start()
    end = time.monotonic() + deadline
    for group in procs.values():
        for p in group:
            p.join(max(end - time.monotonic(), 0.1))
            if p.is_alive():  # a survivor stuck in a collective: the test sees its code, not a hang
                p.kill()
                p.join()
    return {name: [p.exitcode for p in group] for name, group in procs.items()}


def _results(out, job):
    return [torch.load(os.path.join(out, f"{job}-rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def traj_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("traj"))
    _make_trajectory(out)
    return out


@pytest.fixture(scope="module")
def launched(traj_dir, tmp_path_factory):
    """One batch of 2-process groups: the R = 2 runs, and one run per distiller in which rank 1 dies."""
    runs = {"equivalence": (str(tmp_path_factory.mktemp("equivalence")), "equivalence", traj_dir)}
    for kind in ("ld", "krr", "ead"):
        runs[f"die-{kind}"] = (str(tmp_path_factory.mktemp(f"die-{kind}")), "die", (kind, traj_dir))
    codes = _launch(runs)
    return {name: (out, codes[name]) for name, (out, _, _) in runs.items()}


@pytest.fixture(scope="module")
def spawned(launched):
    out, codes = launched["equivalence"]
    assert codes == [0] * WORLD, f"R = 2 runs failed: exit codes {codes}"
    return _results(out, "equivalence")


@pytest.fixture(scope="module")
def single(traj_dir):
    """The same runs in this process, no process group (R = 1)."""
    res = {}
    for variant in ("rr", "second_order"):
        d = _ld(variant)
        d.fit()
        res[f"ld-{variant}"] = _ld_state(d)
    d = _krr()
    d.fit()
    res["krr"] = _krr_state(d)
    d = _dm()
    d.fit()
    res["dm"] = _dm_state(d)
    for name, kw in (("ead", {}), ("ead-tm1", {"t_m": 1, "syn_batch": None})):
        d = _ead(traj_dir, **kw)
        d.fit()
        res[name] = _ead_state(d)
    return res


def _assert_tree(a, b, exact=False):
    if isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOL)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_tree(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree(x, y, exact)
    elif isinstance(a, float) and not exact:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-11)
    else:
        assert a == b


# --------------------------------------------------------------------------- helpers (no processes)


def test_shard_covers_rows_in_balanced_contiguous_ranges():
    for n in (0, 1, 2, 7, 33):
        for world in (1, 2, 3, 5):
            ranges = [shard(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(4, 2, 2)
    with pytest.raises(ValueError, match="world"):
        shard(4, 0, 0)
    assert ring_all_reduce_bytes(1000, 1) == 0 and ring_all_reduce_bytes(1000, 4) == 1500


def test_no_process_group_is_a_no_op():
    ctx = DistContext(None)
    t = torch.arange(3.0)
    assert ctx.all_reduce_sum_([t])[0] is t and torch.equal(t, torch.arange(3.0))
    ctx.broadcast_([t])
    ctx.check_consistent({"a": 1})
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main, ctx.bytes_all_reduced) == (0, 1, False, True, 0)
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
            DistContext(object())


def test_init_from_env_outside_torchrun_names_the_variables(monkeypatch):
    from ddfast.distributed import init_from_env

    if dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set; launch with `torchrun"):
        init_from_env()


# --------------------------------------------------------------------------- R = 2 vs R = 1


@pytest.mark.parametrize("name", ["ld-rr", "ld-second_order", "krr", "dm", "ead", "ead-tm1"])
def test_two_ranks_equal_one_process(spawned, single, name):
    r0, r1 = spawned[0][name], spawned[1][name]
    _assert_tree(r0, r1, exact=True)  # replicas stay bit-identical
    bytes_ = r0.pop("bytes", None)
    single = dict(single[name])
    single.pop("bytes", None)
    _assert_tree(r0, single)
    if name.startswith("ld"):
        assert r0["iteration"] == 6 and len(r0["val"]) == 2
    if bytes_ is not None:  # all-reduced payload per step is the synthetic set's gradient (+ scalars)
        if name.startswith("ld"):  # N_i·C + 1 per iteration, + 1 per validation
            assert bytes_ == 8 * (6 * (8 * 4 + 1) + 2)
        elif name == "krr":
            assert bytes_ == KRR_CFG["steps"] * 8 * (12 * 64 + 12 * 6 + 1)
        elif name == "dm":  # the per-class real feature sums: 4 classes × 32 features (8 channels × 2 × 2)
            assert bytes_ == DM_CFG["iterations"] * 8 * 4 * 32
        else:
            syn = 7 if name == "ead" else 8
            assert bytes_ == EAD_CFG["iterations"] * 8 * (2 + syn * (64 + 4))


def test_mismatched_configs_raise_on_every_rank(spawned):
    for rank in range(WORLD):
        err = spawned[rank]["errors"]
        assert err["ld"] is not None and err["krr"] is not None
        assert "config: rank 1 differs from rank 0" in err["ld"]
        assert "config.outer_batch: rank 0 has 33, rank 1 has 34" in err["ld"]
        assert "config.lam" in err["krr"]


# --------------------------------------------------------------------------- a rank dying mid-run


def _uninterrupted(kind, traj_dir):
    d = {"ld": lambda: _ld("rr"), "krr": _krr, "ead": lambda: _ead(traj_dir)}[kind]()
    d.fit()
    return d


@pytest.mark.parametrize("kind", ["ld", "krr", "ead"])
def test_rank_dying_leaves_a_resumable_checkpoint(kind, traj_dir, launched):
    out, codes = launched[f"die-{kind}"]
    assert codes[1] == 3 and codes[0] != 0, codes  # rank 1 died; rank 0 could not go on without it
    run = os.path.join(out, "run")
    ckpt = os.path.join(run, "checkpoint.safetensors")
    assert os.path.exists(ckpt)
    state = load_state(ckpt)  # intact: a complete file, whatever happened to the writer
    assert PROGRESS[kind](state) == {"ld": 1, "krr": 2, "ead": 2}[kind]  # the last one written
    # Resume with R = 1 (another world size) and finish: equal to an uninterrupted single-process run.
    d = {"ld": lambda: _ld("rr"), "krr": _krr, "ead": lambda: _ead(traj_dir)}[kind]()
    d.fit(out_dir=run, resume=True, checkpoint_every=1)
    want = _uninterrupted(kind, traj_dir)
    if kind == "ld":
        a, b = _ld_state(d), _ld_state(want)
    elif kind == "krr":
        a, b = _krr_state(d), _krr_state(want)
    else:
        a, b = _ead_state(d), _ead_state(want)
    _assert_tree(a, b)


# --------------------------------------------------------------------------- torchrun + CLI


def test_torchrun_cli_smoke(tmp_path):
    """``torchrun --nproc-per-node 2 -m ddfast.cli distill ld ... --distributed``: one report, rank 0's files."""
    import numpy as np

    g = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=g.integers(0, 256, (160, 8, 8), dtype=np.uint8), y_train=np.arange(160) % 4,
             x_test=g.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_test=np.arange(40) % 4)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ddfast.cli", "distill", "ld", "--dataset", f"npz:{data}", "--model", "mlp", "--image-size", "8",
           "--variant", "rr", "--base-examples", "4", "--epochs", "2", "--outer-batch", "50", "--val-every", "1",
           "--out", str(run), "--no-progress", "--distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val accuracy") == 1, proc.stdout
    for name in ("distilled.safetensors", "meta.json", "checkpoint.safetensors"):
        assert (run / name).exists(), name


def test_trajectory_ddp_equals_one_process(spawned, traj_dir):
    """DDP trajectory training (R = 2, each rank half of every global minibatch) = one process, float32."""
    one = Trajectory.open(traj_dir)
    for rank in range(WORLD):
        got = spawned[rank]["trajectory"]
        assert got["steps"] == list(one.steps)
        for k, v in dict(one.final()).items():
            torch.testing.assert_close(got["final"][k], v, rtol=1e-5, atol=1e-6)
        want = [c["train_loss"] for c in one.index["checkpoints"]]
        assert got["losses"][0] is None and want[0] is None
        torch.testing.assert_close(torch.tensor(got["losses"][1:]), torch.tensor(want[1:]), rtol=1e-5, atol=1e-6)
