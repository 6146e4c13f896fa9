"""DCS on real data (soft-labels-hard-truths supp. §7): does a distillation loss rank subsets by accuracy?

Subsets of the real training set at several IPCs come from class-balanced Random (several seeds),
K-Centers in the teacher's feature space, and EL2N score windows (hard / middle / easy) at an early
checkpoint, plus an adversarial duplicated copy of each (half the elements twice). Each subset gets a
distillation loss — DM (eq. 5, averaged over a few random networks, no augmentation) or TM (eq. 4, averaged
over a few start checkpoints of the expert trajectory) — and the test accuracy of fresh models trained on it
in the HL regime. DCS = −partial Spearman ρ(loss, accuracy | subset size) (:mod:`ddfast.evaluate.dcs`).
"""

from __future__ import annotations

import os

import torch

from ddfast.data import load_dataset

__all__ = ["LOSSES", "dcs_study"]

LOSSES = ("dm", "tm")


def _loss_fn(name, data, traj, seed, repeats):
    x, y = data.train_x, data.train_y
    if name == "dm":
        from ddfast.distill.dm import dm_loss, fresh_network
        from ddfast.models import build_model

        c, h = x.shape[1], x.shape[-1]
        g = torch.Generator().manual_seed(seed)
        nets = [fresh_network(lambda: build_model("convnet", c, data.num_classes, h, widths=(64, 128), norm="instance"),
                              g, x.dtype, x.device) for _ in range(repeats)]

        def loss(images, labels):
            with torch.no_grad():
                return float(sum(dm_loss(images, labels, x, y, net, augment=False) for net in nets) / len(nets))

        return loss
    if name == "tm":
        from ddfast.distill.tm import tm_loss

        starts = torch.linspace(0, max(len(traj) - 3, 0), repeats).round().long().tolist()

        def loss(images, labels):
            g = torch.Generator().manual_seed(seed)
            vals = [tm_loss(images, labels, traj, s, 2, 10, 0.02, generator=g, augment=False) for s in starts]
            return float(sum(v.detach() for v in vals) / len(vals))

        return loss
    raise ValueError(f"loss: expected one of {LOSSES}, got {name!r}")


def dcs_study(dataset: str = "digits", loss: str = "dm", ipcs=(5, 10, 20), *, seeds=(0, 1), models: int = 2,
              budget: int = 100, repeats: int = 3, out: str = "runs/dcs", root: str | None = None,
              progress: bool = False):
    """Run the study; writes ``dcs-<dataset>-<loss>.png`` and returns the :class:`DCSResult`."""
    from ddfast.evaluate.dcs import build_subsets, dcs, plot_dcs
    from ddfast.evaluate.regimes import evaluate
    from ddfast.experiments.ead import trajectory_for
    from ddfast.select import el2n_scores, k_centers, model_features, random_coreset, select_by_score

    data = load_dataset(dataset, root)
    traj = trajectory_for(dataset, data, os.path.join(out, f"trajectory-{dataset}"), progress=progress)
    teacher = traj.build_model()
    teacher.load_state_dict(dict(traj.final()))
    teacher.eval()
    early = traj.build_model()
    early.load_state_dict(dict(traj.load(min(2, len(traj) - 1))))
    early.eval()
    x, y, C = data.train_x, data.train_y, data.num_classes
    feats = model_features(teacher, x)
    scores = el2n_scores(early, x, y)
    selectors = {
        "random": lambda ipc, s: random_coreset(y, ipc, seed=s, num_classes=C),
        "kcenters": lambda ipc, s: k_centers(feats, y, ipc, seed=s, num_classes=C),
        "el2n-hard": lambda ipc, s: select_by_score(scores, y, ipc, mode="hard", num_classes=C),
        "el2n-mid": lambda ipc, s: select_by_score(scores, y, ipc, mode="window", start=0.4, num_classes=C),
        "el2n-easy": lambda ipc, s: select_by_score(scores, y, ipc, mode="easy", num_classes=C),
    }
    subsets = build_subsets(y, ipcs, selectors, seeds=seeds, duplicates=True)
    loss_fn = _loss_fn(loss, data, traj, seeds[0], repeats)

    def accuracy_fn(images, labels):
        res = evaluate(images, labels, "hl", data=data, arch="convnet", model_options={"widths": (32, 64), "norm": "instance"},
                       budget=budget, models=models, seed=seeds[0])
        return res.mean

    result = dcs(subsets, loss_fn, accuracy_fn, x=x, y=y, progress=progress)
    os.makedirs(out, exist_ok=True)
    plot_dcs(result, os.path.join(out, f"dcs-{dataset}-{loss}.png"), title=f"DCS of the {loss.upper()} loss on {dataset}")
    return result
