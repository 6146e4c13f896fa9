"""Every compiled entry point validates what it reads: a fuzz over every torch.ops.ddfast operator (and
the plain functions of ddfast._C) with mismatched shapes, dtypes, devices and strides must see Python
exceptions, never a crash. It runs in a subprocess so that a signal (SIGSEGV, SIGABRT) fails the test
instead of killing the test run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ddfast._C", reason="compiled extension not built")

FUZZ = textwrap.dedent(
    r"""
    import random, sys
    import torch
    import ddfast._C as ext

    torch.manual_seed(0)
    rng = random.Random(0)
    F64 = torch.float64

    def valid(name):
        if name == "ridge_solve_fwd":
            return [torch.randn(3, 5, 4, dtype=F64), torch.randn(3, 5, 2, dtype=F64), torch.ones(3, dtype=F64), False, True]
        if name == "ridge_solve_bwd":
            Z, Y = torch.randn(3, 5, 4, dtype=F64), torch.randn(3, 5, 2, dtype=F64)
            _, L, aux, _, _ = torch.ops.ddfast.ridge_solve_fwd(Z, Y, torch.ones(3, dtype=F64), False, True)
            return [torch.randn(3, 4, 2, dtype=F64), Z, Y, L, aux, False, True, True, True]
        if name == "cholesky_solve":
            return [torch.randn(2, 4, 3, dtype=F64), torch.eye(4, dtype=F64).expand(2, 4, 4).contiguous()]
        if name == "label_metagrad_fwd":
            return [torch.randn(4, 3, dtype=F64), torch.rand(4, 3, dtype=F64), 0.5]
        if name == "label_metagrad_bwd":
            return [torch.randn(4, 5, dtype=F64), torch.randn(3, 5, dtype=F64), torch.randn(3, dtype=F64),
                    torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64), 0.25]
        if name == "ghost_bilinear_fwd":
            return [torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 5, dtype=F64), torch.randn(5, 4, dtype=F64)]
        if name == "ghost_norms_fwd":
            return [torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 5, dtype=F64), True]
        if name == "ghost_inner_fwd":
            return [torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 5, dtype=F64), torch.randn(3, 2, 4, dtype=F64),
                    torch.randn(3, 2, 5, dtype=F64), True]
        if name == "krr_predict_fwd":
            return [torch.randn(2, 6, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 2, dtype=F64),
                    0.5, 1, 0.25, True]
        if name == "krr_predict_bwd":
            Zq, Zs, Ys = torch.randn(2, 6, 4, dtype=F64), torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 3, 2, dtype=F64)
            _, L, alpha, _ = torch.ops.ddfast.krr_predict_fwd(Zq, Zs, Ys, 0.5, 1, 0.25, False)
            return [torch.randn(2, 6, 2, dtype=F64), Zq, Zs, L, alpha, 0.25, 0.5 / 3, True, True, True]
        if name == "relu_max_pool2d_fwd":
            return [torch.randn(2, 3, 5, 6)]
        if name == "relu_max_pool2d_bwd":
            _, code = torch.ops.ddfast.relu_max_pool2d_fwd(torch.randn(2, 3, 5, 6))
            return [torch.randn(2, 3, 2, 3), code, 5, 6, False]
        raise KeyError(name)

    DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]

    def mutate_tensor(t):
        kind = rng.randrange(8)
        if kind == 0 and t.dim() > 0:  # one size off by ±1 (or to 0)
            shape = list(t.shape)
            i = rng.randrange(len(shape))
            shape[i] = max(0, shape[i] + rng.choice([-1, 1, 2, -shape[i]]))
            return torch.randn(shape).to(t.dtype) if t.dtype != torch.uint8 else torch.randint(0, 256, shape, dtype=torch.uint8)
        if kind == 1:  # another dtype
            return t.to(rng.choice(DTYPES))
        if kind == 2:  # another rank
            return t.unsqueeze(0) if rng.random() < 0.5 or t.dim() == 0 else t.reshape(-1)
        if kind == 3 and t.dim() >= 2:  # non-contiguous
            return t.transpose(-1, -2)
        if kind == 4:  # a large batch (out-of-bounds reads when not checked)
            return t.expand(2000, *t.shape) if t.dim() < 4 else t
        if kind == 5:  # meta device mixed with CPU
            return t.to("meta")
        if kind == 6:  # garbage values (codes, NaN)
            return t.clone().fill_(255) if t.dtype == torch.uint8 else torch.full_like(t, float("nan")) if t.is_floating_point() else t
        return torch.empty(0, dtype=t.dtype)

    def mutate(args):
        args = list(args)
        idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        for _ in range(rng.choice([1, 1, 2])):
            i = rng.choice(idx)
            args[i] = mutate_tensor(args[i])
        if rng.random() < 0.2:  # scalars: bools flipped, sizes off
            for i, a in enumerate(args):
                if isinstance(a, bool):
                    args[i] = not a
                elif isinstance(a, int):
                    args[i] = a + rng.choice([-5, -1, 1, 7])
        return args

    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ddfast::")
                   and not n.split("::")[1].startswith("triton_"))
    assert len(names) >= 10, names
    trials = int(sys.argv[1])
    calls = errors = 0
    for name in names:
        op = getattr(torch.ops.ddfast, name)
        plain = getattr(ext, name, None)
        for fn in (op, plain):
            if fn is None:
                continue
            for _ in range(trials):
                args = mutate(valid(name))
                calls += 1
                try:
                    fn(*args)
                except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
                    errors += 1
    # the reported crashes
    for fn in (torch.ops.ddfast.cholesky_solve, ext.cholesky_solve):
        try:
            fn(torch.randn(2000, 100, 3), torch.ones(2000, 100, 1))
            raise SystemExit("cholesky_solve accepted a non-square factor")
        except RuntimeError:
            pass
    Z, Y = torch.randn(4, 5, 3, dtype=F64), torch.randn(4, 5, 2, dtype=F64)
    _, L, aux, _, _ = torch.ops.ddfast.ridge_solve_fwd(Z, Y, torch.ones(4, dtype=F64), False, True)
    for fn in (torch.ops.ddfast.ridge_solve_bwd, ext.ridge_solve_bwd):
        try:
            fn(torch.randn(40, 3, 2, dtype=F64), Z.repeat(10, 1, 1), Y.repeat(10, 1, 1), L, aux, False, True, True, True)
            raise SystemExit("ridge_solve_bwd accepted factors of another batch size")
        except RuntimeError:
            pass
    print(f"FUZZ-OK {len(names)} ops {calls} calls {errors} rejected")
    """
)


def test_no_compiled_entry_point_crashes(tmp_path):
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "20"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (
        f"fuzz process ended with {proc.returncode} (negative: killed by signal {-proc.returncode})\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    assert "FUZZ-OK" in proc.stdout
    n_ops, _, calls, _, rejected, _ = proc.stdout.split("FUZZ-OK", 1)[1].split()
    assert int(n_ops) >= 10 and int(rejected) > int(calls) // 2  # most mutations are invalid and rejected
