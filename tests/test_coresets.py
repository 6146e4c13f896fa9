"""Class-balanced coresets: Random, K-Centers, EL2N / EL2N-SL, GraNd, Forgetting, score windows, CAD-Prune."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.data import load_dataset
from ddfast.select import (
    cad_prune,
    compute_aligned_epochs,
    count_forgetting,
    el2n_from_logits,
    el2n_scores,
    el2n_sl_from_logits,
    el2n_sl_scores,
    examples_seen,
    forgetting_scores,
    forgetting_scores_from_trajectory,
    grand_scores,
    k_centers,
    model_features,
    random_coreset,
    select_by_score,
)
from ddfast.trajectory import train_trajectory

CONV = {"widths": [8, 16], "norm": "batch"}
IPC = 4


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def traj(digits, tmp_path_factory):
    """2 epochs × 20 steps (batch 64 of 1222, last batch 6), a checkpoint every 5 steps: 0, 5, …, 40."""
    out = tmp_path_factory.mktemp("coreset-traj")
    return train_trajectory(digits, "convnet", out, epochs=2, every=5, lr=0.05, momentum=0.9, batch_size=64,
                            model_options=CONV, seed=0, progress=False)


@pytest.fixture(scope="module")
def early(traj):
    """Two networks at early checkpoints (steps 5 and 10), standing in for several seeds."""
    return [traj.load_model(1), traj.load_model(2)]


def _check_coreset(idx, y, ipc, num_classes):
    assert idx.dtype == torch.int64 and idx.shape == (ipc * num_classes,)
    assert 0 <= int(idx.min()) and int(idx.max()) < len(y)
    assert len(set(idx.tolist())) == len(idx)
    assert torch.equal(torch.bincount(y[idx], minlength=num_classes), torch.full((num_classes,), ipc))
    for c in range(num_classes):  # class-major, ascending inside a class
        part = idx[c * ipc : (c + 1) * ipc]
        assert (y[part] == c).all() and torch.equal(part, part.sort().values)


SELECTORS = {
    "random": lambda d, t, m, ipc, seed: random_coreset(d.train_y, ipc, seed=seed, num_classes=d.num_classes),
    "k_centers_pixels": lambda d, t, m, ipc, seed: k_centers(d.train_x, d.train_y, ipc, seed=seed),
    "k_centers_features": lambda d, t, m, ipc, seed: k_centers(model_features(m[0], d.train_x), d.train_y, ipc,
                                                              seed=seed),
    "el2n_hard": lambda d, t, m, ipc, seed: select_by_score(el2n_scores(m, d.train_x, d.train_y), d.train_y, ipc),
    "grand_easy": lambda d, t, m, ipc, seed: select_by_score(grand_scores(m, d.train_x, d.train_y), d.train_y, ipc,
                                                             mode="easy"),
    "forgetting": lambda d, t, m, ipc, seed: select_by_score(
        forgetting_scores_from_trajectory(t, d.train_x, d.train_y), d.train_y, ipc),
    "el2n_window": lambda d, t, m, ipc, seed: select_by_score(el2n_scores(m, d.train_x, d.train_y), d.train_y, ipc,
                                                              mode="window", start=0.3),
    "cad_prune": lambda d, t, m, ipc, seed: cad_prune(t, d.train_x, d.train_y, ipc,
                                                     budget_epochs=2 * 1222 / max(1, ipc * d.num_classes))[0],
}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selector_valid_balanced_deterministic(name, digits, traj, early):
    sel = SELECTORS[name]
    idx = sel(digits, traj, early, IPC, 0)
    _check_coreset(idx, digits.train_y, IPC, digits.num_classes)
    assert torch.equal(idx, sel(digits, traj, early, IPC, 0))
    if name in ("random", "k_centers_pixels", "k_centers_features"):  # the seed draws the (first) points
        assert not torch.equal(idx, sel(digits, traj, early, IPC, 1))


@pytest.mark.parametrize("name", ["random", "k_centers_pixels", "el2n_hard", "cad_prune"])
def test_ipc_larger_than_a_class(name, digits, traj, early):
    counts = torch.bincount(digits.train_y)
    small = int(counts.argmin())
    with pytest.raises(ValueError, match=rf"ipc={int(counts.min()) + 1}: class {small} has only {int(counts.min())}"):
        SELECTORS[name](digits, traj, early, int(counts.min()) + 1, 0)
    with pytest.raises(ValueError, match="ipc"):
        SELECTORS[name](digits, traj, early, 0, 0)


def test_random_matches_per_class_size_exactly():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    _check_coreset(random_coreset(y, 2), y, 2, 3)
    with pytest.raises(ValueError, match="ipc=2: class 3 has only 0"):
        random_coreset(y, 2, num_classes=4)


# ------------------------------------------------------------------------------------------ K-Centers


def test_k_centers_picks_one_point_per_far_cluster():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    pts = torch.cat([c + 0.1 * torch.randn(7, 2, generator=g) for c in centers])  # 3 tight, far clusters
    feats = torch.cat([pts, pts + 1000.0])  # class 1: the same layout, elsewhere
    y = torch.cat([torch.zeros(21), torch.ones(21)]).long()
    for seed in range(5):
        idx = k_centers(feats, y, 3, seed=seed)
        _check_coreset(idx, y, 3, 2)
        assert sorted((idx % 21 // 7).tolist()) == [0, 0, 1, 1, 2, 2]  # one per cluster, per class


def test_k_centers_mean_start_on_a_line():
    # mean 4.2 → first 5.0 (index 3); farthest from it: 0.0 and 10.0 tie at 5 → lower index 0; then 10.0.
    feats = torch.tensor([[0.0], [0.1], [0.2], [5.0], [9.9], [10.0]])
    y = torch.zeros(6, dtype=torch.long)
    assert k_centers(feats, y, 3, start="mean").tolist() == [0, 3, 5]
    assert k_centers(feats, y, 1, start="mean", seed=7).tolist() == [3]


def test_model_features_shape_and_restores_mode(traj, digits):
    m = traj.load_model(-1)
    m.train()
    f = model_features(m, digits.train_x[:10], batch_size=3)
    assert f.shape == (10, m.feature_dim) and m.training
    with pytest.raises(TypeError, match="features"):
        model_features(nn.Linear(3, 2), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ EL2N(-SL)


def _softmax(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def test_el2n_sl_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    T = 2.0
    want = [math.sqrt(sum((a - b) ** 2 for a, b in zip(_softmax(r, T), qr))) / T
            for r, qr in zip(logits.tolist(), q.tolist())]
    torch.testing.assert_close(el2n_sl_from_logits(logits, q, T), torch.tensor(want, dtype=torch.float64))
    # Through a "network" that outputs its input as logits; scores are float32.
    got = el2n_sl_scores(nn.Identity(), logits.float(), q.float(), T=T)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    # A teacher's logits give q = softmax(z_teacher / T).
    teacher = torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, 1.0]])
    qt = torch.tensor([_softmax(r, T) for r in teacher.tolist()])
    torch.testing.assert_close(el2n_sl_scores(nn.Identity(), logits.float(), teacher_logits=teacher, T=T),
                               el2n_sl_from_logits(logits.float(), qt, T))
    with pytest.raises(ValueError, match="exactly one"):
        el2n_sl_scores(nn.Identity(), logits, q, teacher_logits=teacher)


def test_el2n_hand_computation_and_sl_at_T1_onehot(digits, early):
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    p = torch.softmax(logits, 1)
    want = torch.stack([(p[0] - torch.tensor([1.0, 0])).norm(), (p[1] - torch.tensor([0, 1.0])).norm()])
    torch.testing.assert_close(el2n_from_logits(logits, torch.tensor([0, 1])), want)
    x, y = digits.train_x, digits.train_y
    s = el2n_scores(early, x, y)
    assert s.shape == (len(y),) and (s >= 0).all() and (s <= math.sqrt(2) + 1e-6).all()
    torch.testing.assert_close(el2n_sl_scores(early, x, F.one_hot(y, digits.num_classes).float(), T=1.0), s)
    torch.testing.assert_close(el2n_sl_scores(early, x, y, T=1.0), s)  # class indices = one-hot targets
    # The mean over models; state dicts load into copies of a template network.
    each = [el2n_scores(m, x, y) for m in early]
    torch.testing.assert_close(s, (each[0] + each[1]) / 2)
    states = [m.state_dict() for m in early]
    torch.testing.assert_close(el2n_scores(states, x, y, model=early[0]), s)
    with pytest.raises(ValueError, match="model"):
        el2n_scores(states, x, y)


# ---------------------------------------------------------------------------------------------- GraNd


def test_grand_matches_batch_of_one_loop(digits, early):
    # float64 copies: the ghost-product norms and the loop then agree to rounding.
    nets = [copy.deepcopy(m).double().eval() for m in early]
    x, y = digits.train_x[:6].double(), digits.train_y[:6]
    want = torch.zeros(6, dtype=torch.float64)
    for m in nets:
        params = [p for p in m.parameters() if p.requires_grad]
        for n in range(6):
            loss = F.cross_entropy(m(x[n : n + 1]), y[n : n + 1], reduction="sum")
            g = torch.autograd.grad(loss, params)
            want[n] += torch.sqrt(sum(gi.pow(2).sum() for gi in g)) / len(nets)
    torch.testing.assert_close(grand_scores(nets, x, y), want.float(), rtol=1e-5, atol=1e-6)
    assert all(not m.training for m in nets)


# ------------------------------------------------------------------------------------------ Forgetting


def test_count_forgetting_hand_built():
    correct = torch.tensor([[1, 0, 1, 0],
                            [0, 0, 1, 1],
                            [1, 0, 0, 0],
                            [0, 0, 1, 1]], dtype=torch.bool)
    # ex 0: 1→0 twice; ex 1: never learned → max + 1 = 3; ex 2: 1→0 once; ex 3: 1→0 once.
    assert count_forgetting(correct).tolist() == [2, 3, 1, 1]
    assert count_forgetting(correct[:, [2, 3]]).tolist() == [1, 1]  # nobody unlearned: no bump
    assert count_forgetting(torch.ones(1, 3, dtype=torch.bool)).tolist() == [0, 0, 0]
    preds = torch.tensor([[0, 1], [1, 1], [0, 0]])
    assert forgetting_scores(preds, torch.tensor([0, 1])).tolist() == [1, 1]


def test_forgetting_from_trajectory_matches_predictions(traj, digits):
    x, y = digits.train_x, digits.train_y
    preds = []
    for i in range(1, len(traj)):  # step 0 (the initialisation) is left out by default
        m = traj.load_model(i).eval()
        with torch.no_grad():
            preds.append(m(x).argmax(1))
    got = forgetting_scores_from_trajectory(traj, x, y)
    assert torch.equal(got, forgetting_scores(torch.stack(preds), y))
    assert got.dtype == torch.int64 and got.shape == (len(y),)


# ---------------------------------------------------------------------------------------- score windows


def test_select_by_score_modes():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    s = torch.tensor([0.1, 0.4, 0.3, 0.2, 5.0, 6.0, 7.0, 8.0])
    assert select_by_score(s, y, 2, "hard").tolist() == [1, 2, 6, 7]
    assert select_by_score(s, y, 2, "easy").tolist() == [0, 3, 4, 5]
    assert select_by_score(s, y, 2, "window", start=0.25).tolist() == [2, 3, 5, 6]  # ranks 1–2, hardest first
    assert select_by_score(s, y, 2, "window", start=0.0).tolist() == [1, 2, 6, 7]
    assert select_by_score(s, y, 2, "window", start=1.0).tolist() == [0, 3, 4, 5]  # clamped to the end
    assert select_by_score(torch.zeros(8), y, 1, "hard").tolist() == [0, 4]  # ties: lower index
    with pytest.raises(ValueError, match="start"):
        select_by_score(s, y, 2, "window")
    with pytest.raises(ValueError, match="mode"):
        select_by_score(s, y, 2, "middle")
    with pytest.raises(ValueError, match="ipc=5: class 0 has only 4"):
        select_by_score(s, y, 5)


# ------------------------------------------------------------------------------------------- CAD-Prune


@pytest.mark.parametrize("step", [10, 25])
def test_cad_prune_picks_compute_aligned_checkpoint(traj, digits, step):
    n, b = len(digits.train_y), 64
    seen = (step // 20) * n + min((step % 20) * b, n)  # 20 steps per epoch
    i = traj.steps.index(step)
    assert examples_seen(traj, i) == seen
    budget_epochs = seen / (IPC * digits.num_classes)  # so that budget_epochs · ipc · C = examples seen
    idx, report = cad_prune(traj, digits.train_x, digits.train_y, IPC, budget_epochs, variant="early")
    assert report["checkpoint"] == i and report["step"] == step and report["criterion"] == "median-heuristic"
    _check_coreset(idx, digits.train_y, IPC, digits.num_classes)
    # The chosen window is the one of select_by_score on that checkpoint's EL2N.
    scores = el2n_scores(traj.load_model(i), digits.train_x, digits.train_y)
    assert torch.equal(idx, select_by_score(scores, digits.train_y, IPC, "window", start=report["start"]))


def test_cad_prune_evaluate_fn_and_budget_beyond_run(traj, digits):
    x, y = digits.train_x, digits.train_y
    calls = []

    def evaluate_fn(idx):  # prefers the window starting at 0.3 of the ranking
        calls.append(idx)
        return -abs(len(calls) - 4)

    idx, report = cad_prune(traj, x, y, IPC, 1.0, evaluate_fn=evaluate_fn, starts=(0.0, 0.1, 0.2, 0.3, 0.4),
                            variant="early")
    assert report["start"] == 0.3 and report["criterion"] == "evaluate_fn" and torch.equal(idx, calls[3])
    assert report["step"] == 5  # 40 examples of budget: the earliest trained checkpoint (320 seen) is closest
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _, report = cad_prune(traj, x, y, IPC, 1e4, variant="early")
    assert report["checkpoint"] == len(traj) - 1 and any("exceeds" in str(m.message) for m in w)


def test_cad_prune_default_scores_the_final_model_of_a_compute_aligned_run(traj, digits):
    # Supplement Table 11: the final model of a full training whose compute matches the budget (default),
    # not an early checkpoint of a longer run.
    x, y, C = digits.train_x, digits.train_y, digits.num_classes
    n = len(y)
    assert compute_aligned_epochs(n, IPC, C, 2 * n / (IPC * C)) == 2  # the fixture's 2 epochs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # aligned: no warning
        idx, report = cad_prune(traj, x, y, IPC, 2 * n / (IPC * C))
    assert report["variant"] == "final" and report["checkpoint"] == len(traj) - 1
    scores = el2n_scores(traj.load_model(len(traj) - 1), x, y)
    assert torch.equal(idx, select_by_score(scores, y, IPC, "window", start=report["start"]))
    # an early checkpoint would be chosen by the other variant for a one-epoch budget
    assert cad_prune(traj, x, y, IPC, n / (IPC * C), variant="early")[1]["checkpoint"] < len(traj) - 1
    with pytest.warns(UserWarning, match="compute_aligned_epochs"):
        cad_prune(traj, x, y, IPC, 10 * n / (IPC * C))
    with pytest.raises(ValueError, match="variant"):
        cad_prune(traj, x, y, IPC, 1.0, variant="middle")
