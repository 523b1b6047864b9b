"""The PNG figures of a run: per question type bars with 95% intervals, the yes/no confusion
matrix, clinical-efficacy F1 per observation. Pure presentation: nothing here scores anything.

Figures are made with matplotlib's object API (Figure + Agg canvas), not pyplot, so no global
figure state or GUI backend is involved.
"""

from __future__ import annotations

from pathlib import Path


def write_plots(out: Path, results: dict) -> list[str]:
    """Write the PNGs that fit this run; return their file names."""
    written = []
    if results.get("by_question_type"):
        _save(_question_type_figure(results), out / "question_types.png", written)
    conf = results.get("yes_no_confusion")
    if conf and sum(map(sum, conf["matrix"])):
        _save(_confusion_figure(conf), out / "yes_no_confusion.png", written)
    if results.get("clinical_efficacy"):
        _save(_efficacy_figure(results["clinical_efficacy"]["ce"]), out / "clinical_efficacy.png", written)
    return written


def _save(fig, path: Path, written: list[str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    written.append(path.name)


def _bars(ax, groups: dict, key: str, title: str, color: str) -> None:
    names = list(groups)
    values = [groups[q][key] for q in names]
    lows = [v - groups[q]["ci95"][0] if groups[q]["ci95"] else 0 for q, v in zip(names, values)]
    highs = [groups[q]["ci95"][1] - v if groups[q]["ci95"] else 0 for q, v in zip(names, values)]
    ax.barh(names, values, xerr=[lows, highs], color=color, capsize=3, ecolor="0.3")
    for y, (q, v) in enumerate(zip(names, values)):
        ax.text(1.02, y, f"{v:.2f}  n={groups[q]['n']}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def _question_type_figure(results: dict):
    from matplotlib.figure import Figure

    types = results["by_question_type"]
    panels = [(k, t) for k, t in (("closed", "Closed: strict accuracy"), ("open", "Open: token recall")) if k in types]
    rows = max(len(types[k]) for k, _ in panels)
    fig = Figure(figsize=(5.2 * len(panels), 0.9 + 0.35 * rows), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, title) in zip(axes, panels):
        _bars(ax, types[kind], "strict" if kind == "closed" else "recall", title,
              "tab:blue" if kind == "closed" else "tab:orange")
    fig.suptitle(f"{results['task']} ({results['split']}) by question type, 95% bootstrap CI", fontsize=11)
    return fig


def _confusion_figure(conf: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(conf["matrix"], cmap="Blues")
    peak = max(map(max, conf["matrix"])) or 1
    for r, row in enumerate(conf["matrix"]):
        for c, v in enumerate(row):
            ax.text(c, r, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(3), conf["predicted"])
    ax.set_yticks(range(2), conf["gold"])
    ax.set_xlabel("prediction")
    ax.set_ylabel("gold")
    ax.set_title("Closed yes/no questions", fontsize=10)
    return fig


def _efficacy_figure(block: dict):
    from matplotlib.figure import Figure

    per = block["per_label"]
    names = list(per)
    fig = Figure(figsize=(6, 0.9 + 0.3 * len(names)), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [per[n]["f1"] for n in names], color="tab:green")
    for y, n in enumerate(names):
        ax.text(1.02, y, f"support {per[n]['support']}", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_title(f"Clinical efficacy F1 per observation (micro F1 {block['micro_f1']:.3f})", fontsize=10)
    return fig
