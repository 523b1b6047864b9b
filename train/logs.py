"""Training metrics: metrics.csv (one row per optimizer step), eval.csv, loss.png, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

from vlm.errors import ConfigError


class MetricsLog:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = False, resume_step: int = 0):
        self.out, self.enabled = Path(out), enabled
        self.train_csv, self.eval_csv = self.out / "metrics.csv", self.out / "eval.csv"
        self.writer = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        # A resumed run rewrites history after its checkpoint, so rows are never duplicated.
        for path in (self.train_csv, self.eval_csv):
            _truncate_after(path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard.") from None

            self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def train(self, step: int, epoch: int, row: dict) -> None:
        self._append(self.train_csv, {"step": step, "epoch": epoch, **row}, "train")

    def eval(self, step: int, metrics: dict) -> None:
        if metrics:
            self._append(self.eval_csv, {"step": step, **metrics}, "eval")

    def _append(self, path: Path, row: dict, group: str) -> None:
        if not self.enabled:
            return
        rows = _read(path)
        fields = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row.keys()]))
        rows.append({k: _fmt(v) for k, v in row.items()})
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{group}/{key}", value, row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        plot_losses(self.train_csv, self.eval_csv, self.out / "loss.png")
        if self.writer is not None:
            self.writer.close()


def plot_losses(train_csv: Path, eval_csv: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read(train_csv)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    steps = [int(r["step"]) for r in rows]
    ax.plot(steps, [float(r["loss"]) for r in rows], label="train loss", lw=1)
    evals = [r for r in _read(eval_csv) if r.get("val_loss")]
    if evals:
        ax.plot([int(r["step"]) for r in evals], [float(r["val_loss"]) for r in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(png.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _truncate_after(path: Path, step: int) -> None:
    rows = [r for r in _read(path) if int(r["step"]) <= step]
    if not path.is_file():
        return
    if not rows:
        path.unlink()
        return
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value):
    return f"{value:.6g}" if isinstance(value, float) else value
