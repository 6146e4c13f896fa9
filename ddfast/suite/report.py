"""``ddfast suite report``: markdown tables and plots from the tidy table.

Seeds are pooled: a table entry is the mean ± std over every student of every seed of that method, data
set, IPC, regime and augmentation. Gains are averaged over seeds (each seed matched with its own random
subset). Plots: accuracy vs IPC per method, one panel per regime, with ±std error bars; a heat map of the
gain over random (methods × regime/IPC).
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict

from ddfast.suite import scores as S

__all__ = ["aggregate", "accuracy_table", "gain_table", "scores_table", "render", "plot_accuracy", "plot_gain",
           "update_readme", "write_report"]

REGIME_NAMES = {"hl": "HL", "sl": "SL", "sl+kd": "SL+KD", "finetune": "fine-tune", "linear": "linear"}


def _mean(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(v) / len(v) if v else None


def aggregate(rows: list[dict], augmentation: str = "default") -> OrderedDict:
    """``{(dataset, method): {(regime, ipc): {...}}}`` pooled over seeds, for one augmentation setting."""
    out: OrderedDict = OrderedDict()
    for r in rows:
        if r.get("status") != "done" or r.get("augmentation") != augmentation:
            continue
        cell = out.setdefault((r["dataset"], r["name"]), OrderedDict()).setdefault((r["regime"], int(r["ipc"])), {
            "accs": [], "gain": [], "soft_label_gain": [], "kd_gain": [], "augmentation_gain": [],
            "augmentation_robustness": [], "seconds": []})
        cell["accs"] += [float(a) for a in str(r["accuracies"]).split(";") if a]
        for k in ("gain", "soft_label_gain", "kd_gain", "augmentation_gain", "augmentation_robustness"):
            cell[k].append(r.get("gain_over_random" if k == "gain" else k))
        cell["seconds"].append((r.get("eval_seconds") or 0) + (r.get("set_seconds") or 0))
    return out


def _columns(agg) -> list:
    order = list(REGIME_NAMES)
    cols = {k for cells in agg.values() for k in cells}
    return sorted(cols, key=lambda c: (order.index(c[0]) if c[0] in order else 99, c[1]))


def _header(cols, first: str) -> list[str]:
    return ["| " + first + " | " + " | ".join(f"{REGIME_NAMES.get(r, r)} IPC {i}" for r, i in cols) + " |",
            "|---|" + "---:|" * len(cols)]


def accuracy_table(rows, augmentation: str = "default") -> str:
    agg = aggregate(rows, augmentation)
    cols = _columns(agg)
    multi = len({d for d, _ in agg}) > 1
    lines = _header(cols, "method")
    for (dataset, name), cells in agg.items():
        vals = []
        for c in cols:
            if c in cells and cells[c]["accs"]:
                m, s = S.mean_std(cells[c]["accs"])
                vals.append(f"{m:.2f} ± {s:.2f}")
            else:
                vals.append("–")
        lines.append(f"| {name}{f' ({dataset})' if multi else ''} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def gain_table(rows, augmentation: str = "default") -> str:
    agg = aggregate(rows, augmentation)
    cols = _columns(agg)
    lines = _header(cols, "gain over random")
    for (dataset, name), cells in agg.items():
        vals = []
        for c in cols:
            g = _mean(cells[c]["gain"]) if c in cells else None
            vals.append("–" if g is None else f"{g:+.2f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def scores_table(rows) -> str:
    """Per method and IPC: soft-label gain L, KD gain K, augmentation gain Δ and robustness ρ (per regime), worst gain W."""
    agg = aggregate(rows, "default")
    ipcs = sorted({i for cells in agg.values() for (_, i) in cells})
    regimes = [r for r in REGIME_NAMES if any((r, i) in cells for cells in agg.values() for i in ipcs)]
    head = ["L = SL − HL", "K = SL+KD − SL"] + [f"Δ {REGIME_NAMES[r]}" for r in regimes] + \
        [f"ρ {REGIME_NAMES[r]}" for r in regimes] + ["W"]
    lines = ["| method | IPC | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    worst = {}
    for r in rows:
        if r.get("status") == "done" and r.get("worst_gain") is not None:
            worst.setdefault((r["dataset"], r["name"], int(r["ipc"])), {})[r["cell_id"]] = r["worst_gain"]
    for (dataset, name), cells in agg.items():
        for i in ipcs:
            def pick(regime, key):
                v = _mean(cells[(regime, i)][key]) if (regime, i) in cells else None
                return "–" if v is None else f"{v:+.2f}"

            w = _mean(list(worst.get((dataset, name, i), {}).values()))
            vals = [pick("sl", "soft_label_gain"), pick("sl+kd", "kd_gain")] + \
                [pick(r, "augmentation_gain") for r in regimes] + [pick(r, "augmentation_robustness") for r in regimes] + \
                ["–" if w is None else f"{w:+.2f}"]
            lines.append(f"| {name} | {i} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def render(rows, title: str = "") -> str:
    """The markdown report: accuracy (default augmentation, and without when evaluated), gains, scores."""
    parts = []
    if title:
        parts.append(f"# {title}\n")
    datasets = sorted({r["dataset"] for r in rows})
    done = [r for r in rows if r.get("status") == "done"]
    parts.append(f"Test accuracy (%), mean ± std over every student of every seed; data: {', '.join(datasets)}; "
                 f"{len({r['cell_id'] for r in done})} cells done.\n")
    parts.append("## Accuracy\n\n" + accuracy_table(rows, "default") + "\n")
    if any(r.get("augmentation") == "none" for r in done):
        parts.append("## Accuracy without augmentation\n\n" + accuracy_table(rows, "none") + "\n")
    if any(r.get("gain_over_random") is not None for r in done):
        parts.append("## Gain over a random real subset of the same size (points)\n\n" + gain_table(rows) + "\n")
        parts.append("## Scores (points; definitions in docs/suite.md)\n\n" + scores_table(rows) + "\n")
    bad = [r for r in rows if r.get("status") != "done"]
    if bad:
        lines = ["## Not done\n", "| cell | method | IPC | seed | status | error |", "|---|---|---:|---:|---|---|"]
        seen = set()
        for r in bad:
            if r["cell_id"] in seen:
                continue
            seen.add(r["cell_id"])
            lines.append(f"| {r['cell_id']} | {r['name']} | {r['ipc']} | {r['seed']} | {r['status']} | "
                         f"{str(r.get('error') or '').replace('|', '/')[:160]} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_accuracy(rows, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, "default")
    regimes = [r for r in REGIME_NAMES if any(k[0] == r for cells in agg.values() for k in cells)]
    fig, axes = plt.subplots(1, max(len(regimes), 1), figsize=(4.2 * max(len(regimes), 1), 3.4), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for (dataset, name), cells in agg.items():
            pts = sorted((i, *S.mean_std(c["accs"])) for (r, i), c in cells.items() if r == regime and c["accs"])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                            label=name)
        ax.set_title(REGIME_NAMES[regime])
        ax.set_xlabel("images per class")
        ax.set_xscale("log")
        ipcs = sorted({i for cells in agg.values() for (r, i) in cells if r == regime})
        ax.set_xticks(ipcs, [str(i) for i in ipcs])
        ax.minorticks_off()
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gain(rows, path: str) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(rows, "default")
    cols = _columns(agg)
    names = [n for (_, n) in agg]
    grid = [[_mean(cells[c]["gain"]) if c in cells else None for c in cols] for cells in agg.values()]
    if not any(v is not None for row in grid for v in row):
        return None
    vals = [[math.nan if v is None else v for v in row] for row in grid]
    lim = max(abs(v) for row in vals for v in row if not math.isnan(v)) or 1.0
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 0.45 * len(names) + 1.4))
    im = ax.imshow(vals, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{REGIME_NAMES.get(r, r)}\nIPC {i}" for r, i in cols], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for y, row in enumerate(vals):
        for x, v in enumerate(row):
            if not math.isnan(v):
                ax.text(x, y, f"{v:+.1f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, label="gain over random (points)")
    ax.set_title("gain over a random real subset of the same size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


README_BEGIN = "<!-- suite-table:{name} -->"
README_END = "<!-- /suite-table:{name} -->"


def update_readme(path: str, name: str, table: str) -> bool:
    """Replace the text between ``<!-- suite-table:NAME -->`` and ``<!-- /suite-table:NAME -->`` in ``path``
    with ``table``. Returns False (and changes nothing) when the markers are absent."""
    with open(path) as f:
        text = f.read()
    begin, end = README_BEGIN.format(name=name), README_END.format(name=name)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    new = pattern.sub(lambda m: f"{begin}\n{table}\n{end}", text)
    if new != text:
        from ddfast.artifacts import _atomic_write

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(new)

        _atomic_write(path, write)
    return True


def write_report(rows, out_dir: str, name: str, *, plots: bool = True, csv_path: str | None = None) -> dict:
    """``out_dir/results.md`` (+ ``accuracy.png``, ``gain.png``, and a copy of the CSV) for suite ``name``."""
    from ddfast.artifacts import _atomic_write
    from ddfast.suite.results import write_table

    os.makedirs(out_dir, exist_ok=True)
    md = render(rows, title=f"Suite {name}")
    written = {}
    fig_lines = []
    if plots:
        try:
            written["accuracy"] = plot_accuracy(rows, os.path.join(out_dir, "accuracy.png"))
            fig_lines.append("![accuracy vs IPC](accuracy.png)")
            g = plot_gain(rows, os.path.join(out_dir, "gain.png"))
            if g:
                written["gain"] = g
                fig_lines.append("![gain over random](gain.png)")
        except ImportError:
            pass
    if fig_lines:
        md += "\n" + "\n".join(fig_lines) + "\n"
    md_path = os.path.join(out_dir, "results.md")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(md)

    _atomic_write(md_path, write)
    written["markdown"] = md_path
    if csv_path is None or os.path.abspath(csv_path) != os.path.abspath(os.path.join(out_dir, "results.csv")):
        written["csv"] = write_table(rows, os.path.join(out_dir, "results.csv"))[0]
    return written
