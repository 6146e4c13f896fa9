"""Ridge ops validate every argument by name and never return a silent NaN (``check_finite=False`` opts out)."""

from __future__ import annotations

import pytest
import torch

from ddfast.errors import NotPSDError
from ddfast.ops import krr_predict, krr_predict_from_gram, ridge_from_gram, ridge_weights
from ddfast.ops.label_metagrad import ridge_label_metagrad

Z, Y, ZQ = torch.randn(4, 6, 5), torch.randn(4, 6, 3), torch.randn(4, 2, 5)
K = torch.randn(6, 6).mT @ torch.randn(6, 6) + torch.eye(6)
KQ = torch.randn(3, 6)
YK = torch.randn(6, 2)


def nan_at(x, idx=(0,)):
    x = x.clone()
    x.view(-1)[idx[0]] = float("nan")
    return x


BAD = [
    (lambda: ridge_weights(Z, Y, 1e300), ValueError, r"lam: 1e\+300 overflows the solve dtype torch.float32"),
    (lambda: ridge_weights(Z, Y, float("nan")), ValueError, r"lam: expected a finite positive float"),
    (lambda: ridge_weights(Z, Y, float("inf")), ValueError, r"lam: expected a finite positive float"),
    (lambda: ridge_weights(Z, Y, -0.5), ValueError, r"lam: expected a finite positive float"),
    (lambda: ridge_weights(Z, Y, True), TypeError, r"lam: expected a positive float or a tensor"),
    (lambda: ridge_weights(Z, Y, torch.tensor([1.0, float("nan"), 1.0, 1.0])), ValueError, r"lam: expected every entry"),
    (lambda: ridge_weights(Z, Y, torch.tensor([1.0, float("inf"), 1.0, 1.0])), ValueError, r"lam: expected every entry"),
    (lambda: ridge_weights(Z, Y, torch.ones(4, dtype=torch.long)), TypeError, r"lam: expected a float or a float32/float64"),
    (lambda: ridge_weights(Z, Y, 1.0, bias=0.5), TypeError, r"bias: expected a bool"),
    (lambda: ridge_weights(Z, Y, 1.0, out_dtype=torch.float16), TypeError, r"out_dtype: expected None, torch.float32"),
    (lambda: ridge_weights(Z, Y, 1.0, check_finite="yes"), TypeError, r"check_finite: expected None or a bool"),
    (lambda: ridge_weights(Z, "Y", 1.0), TypeError, r"Y: expected a torch.Tensor"),
    (lambda: ridge_weights(Z[0, 0], Y, 1.0), ValueError, r"Z: expected at least 2 dims"),
    (lambda: krr_predict(ZQ[0, 0], Z, Y, 1.0), ValueError, r"Zq: expected at least 2 dims"),
    (lambda: krr_predict(ZQ, Z, Y[..., :4, :], 1.0), ValueError, r"Ys: expected 6 rows"),
    (lambda: krr_predict(ZQ, Z, Y, 1.0, bias=-0.1), ValueError, r"bias: expected a bool or a finite kernel constant"),
    (lambda: krr_predict(ZQ, Z, Y, 1.0, bias=float("inf")), ValueError, r"bias: expected a bool or a finite kernel"),
    (lambda: krr_predict(ZQ, Z[0], Y, 1.0), ValueError, r"Ys: expected \(N, C\) or \(N,\) like the shared support"),
    (lambda: krr_predict(ZQ, Z, Y, 1e39), ValueError, r"lam: 1e\+39 overflows"),
    (lambda: ridge_from_gram(K[:, :5], YK, 1.0), ValueError, r"K_ss: expected a square kernel matrix"),
    (lambda: ridge_from_gram(K, YK[:5], 1.0), ValueError, r"Y: expected 6 rows like K_ss"),
    (lambda: ridge_from_gram(K, YK, 0.0), ValueError, r"lam: expected a finite positive float"),
    (lambda: ridge_from_gram(K, YK, 1.0, bias=True), ValueError, r"bias: expected a finite kernel constant"),
    (lambda: ridge_from_gram(K, YK, 1.0, reg="l2"), ValueError, r"reg: expected one of"),
    (lambda: ridge_from_gram(K.long(), YK, 1.0), TypeError, r"K_ss: expected dtype float32 or float64"),
    (lambda: krr_predict_from_gram(K, KQ[:, :5], YK, 1.0), ValueError, r"K_qs: expected 6 columns like K_ss"),
    (lambda: krr_predict_from_gram(K, KQ.double(), YK, 1.0), TypeError, r"K_qs: expected dtype torch.float32"),
    (lambda: krr_predict_from_gram(K.expand(2, 6, 6), KQ.expand(3, 3, 6), YK, 1.0), ValueError, r"batch dims do not broadcast"),
    (lambda: krr_predict_from_gram(K, KQ, YK, 1.0, solve_dtype=torch.float16), TypeError, r"solve_dtype"),
]


@pytest.mark.parametrize("call, exc, match", BAD)
def test_bad_argument_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_huge_lam_is_fine_in_a_wide_enough_solve_dtype():
    W = ridge_weights(Z, Y, 1e300, solve_dtype=torch.float64)
    assert torch.isfinite(W).all() and W.abs().max().item() < 1e-290


NONFINITE = [
    ("Zq", lambda c: krr_predict(nan_at(ZQ), Z, Y, 0.5, check_finite=c)),
    ("Zs", lambda c: krr_predict(ZQ, nan_at(Z), Y, 0.5, check_finite=c)),
    ("Ys", lambda c: krr_predict(ZQ, Z, Y * float("inf"), 0.5, check_finite=c)),
    ("Z", lambda c: ridge_weights(nan_at(Z, (7,)), Y, 0.5, check_finite=c)),
    ("Y", lambda c: ridge_weights(Z, nan_at(Y), 0.5, check_finite=c)),
    ("Zs", lambda c: krr_predict(ZQ, nan_at(Z), Y, 0.5, backend="reference", check_finite=c)),
    ("Zq", lambda c: krr_predict(nan_at(ZQ), Z, Y, 0.5, reg="trace", bias=0.01, check_finite=c)),
    ("K_ss", lambda c: ridge_from_gram(nan_at(K), YK, 0.5, check_finite=c)),
    ("K_qs", lambda c: krr_predict_from_gram(K, nan_at(KQ), YK, 0.5, check_finite=c)),
    ("Y", lambda c: krr_predict_from_gram(K, KQ, nan_at(YK), 0.5, check_finite=c)),
]


@pytest.mark.parametrize("name, call", NONFINITE, ids=[f"{n}-{i}" for i, (n, _) in enumerate(NONFINITE)])
def test_nonfinite_input_is_named_and_check_finite_false_opts_out(name, call):
    with pytest.raises((ValueError, NotPSDError), match=rf"^{name}: contains NaN or Inf"):
        call(None)
    # The opt-out skips the check on success (no host sync): a NaN that the solve survives flows through;
    # a solve that fails on it is still a typed error naming the input (that costs nothing on success).
    try:
        out = call(False)
    except (ValueError, NotPSDError) as exc:
        assert str(exc).startswith(f"{name}: contains NaN or Inf") or isinstance(exc, NotPSDError)
        return
    assert not torch.isfinite(out).all()


def test_check_finite_false_returns_nan_without_raising():
    """NaN in the queries only (the solve itself is fine): check_finite=False returns the NaN rows as they are."""
    out = krr_predict(nan_at(ZQ), Z, Y, 0.5, check_finite=False)
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[1:]).all()
    with pytest.raises(ValueError, match="Zq: contains NaN"):
        krr_predict(nan_at(ZQ), Z, Y, 0.5)


def test_meta_inputs_never_hit_item():
    Km, KQm, Ym = (x.to("meta") for x in (K, KQ, YK))
    assert krr_predict_from_gram(Km, KQm, Ym, torch.tensor(0.5, device="meta")).shape == (3, 2)
    assert ridge_weights(Z.to("meta"), Y.to("meta"), 1e-3, reg="trace").shape == (4, 5, 3)


def _rr_args():
    zb, y = torch.randn(8, 5), torch.softmax(torch.randn(8, 3), 1)
    return [zb, y, torch.randn(6, 5), torch.randint(0, 3, (6,)), torch.zeros(6, 3)]


@pytest.mark.parametrize("which, name", [(0, "z_base"), (1, "y_soft"), (2, "z_real"), (4, "w_prev")])
def test_ridge_label_metagrad_names_nonfinite_inputs(which, name):
    args = _rr_args()
    args[which] = nan_at(args[which])
    with pytest.raises(ValueError, match=rf"^{name}: contains NaN or Inf"):
        ridge_label_metagrad(*args)
    try:  # opt-out: no check on success; a solve that fails on the NaN is still named
        out = ridge_label_metagrad(*args, check_finite=False)
    except (ValueError, NotPSDError) as exc:
        assert isinstance(exc, NotPSDError) or "contains NaN or Inf" in str(exc)
        return
    assert not all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("kw, match", [
    ({"pseudo_lr": float("nan")}, r"pseudo_lr: expected a float in \(0, 1\]"),
    ({"pseudo_lr": 0.0}, r"pseudo_lr: expected a float in \(0, 1\]"),
    ({"scale": float("nan")}, r"scale: expected a float finite"),
    ({"lam": -1.0}, r"lam: expected a float finite and > 0"),
    ({"lam": "1"}, r"lam: expected a float"),
])
def test_ridge_label_metagrad_scalars(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ridge_label_metagrad(*_rr_args(), **kw)
