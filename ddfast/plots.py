"""Figures: base examples with their learned soft labels (label-distillation §4.5 label analysis)."""

from __future__ import annotations

import torch

__all__ = ["plot_labels"]


def plot_labels(images: torch.Tensor, labels: torch.Tensor, path: str, classes=None, true_labels=None, max_images: int = 20):
    """Save a PNG: the first ``max_images`` base images with their labels as bars, and a heatmap of all labels.

    Args:
        images: pixel values in [0, 1], ``[N, c, h, w]``.  labels: soft labels ``[N, C]``.
        classes: names of the C target classes.  true_labels: the base examples' own classes, if any.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = images.detach().cpu().float(), labels.detach().cpu().float()
    N, C = labels.shape
    k = min(N, max_images)
    names = list(classes) if classes is not None and len(classes) == C else [str(c) for c in range(C)]
    fig = plt.figure(figsize=(max(8, 1.1 * k), 6.5))
    grid = fig.add_gridspec(3, k, height_ratios=[1.0, 1.0, 1.6], hspace=0.45)
    for i in range(k):
        ax = fig.add_subplot(grid[0, i])
        img = images[i].clamp(0, 1)
        img = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if true_labels is not None:
            ax.set_title(names[int(true_labels[i])], fontsize=8)
        bx = fig.add_subplot(grid[1, i])
        bx.bar(range(C), labels[i].numpy(), color="tab:blue")
        bx.set_ylim(0, 1)
        bx.set_xticks(range(C))
        bx.set_xticklabels(names, fontsize=5, rotation=90)
        if i:
            bx.set_yticks([])
    hx = fig.add_subplot(grid[2, :])
    im = hx.imshow(labels.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    hx.set_yticks(range(C))
    hx.set_yticklabels(names, fontsize=6)
    hx.set_xlabel("base example")
    fig.colorbar(im, ax=hx, fraction=0.02)
    fig.suptitle(f"learned soft labels of {N} base examples")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
