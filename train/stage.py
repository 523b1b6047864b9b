"""What a training stage tells the one loop: its model, data, loss and how to save it.

The three stages (clip, align, instruct) differ only in these answers; the loop in loop.py does
everything else (accumulation, autocast, schedule, clipping, eval, checkpoints, resume, logs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class StepStats:
    """What one micro-batch contributed, for the progress bar and the metrics CSV."""

    loss: torch.Tensor
    samples: int
    tokens: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Stage(Protocol):
    name: str

    def build_model(self) -> nn.Module:
        """The model with requires_grad set on exactly the parameters this stage trains."""

    def datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None]:
        """(train, validation or None), already validated (see train/data.py)."""

    def collate(self, records: list[Any]) -> dict[str, Any]:
        """A list of dataset items -> one batch."""

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepStats:
        """Forward one batch and return its mean loss (the loop does backward)."""

    def evaluate(self, model: nn.Module, val_set) -> dict[str, float]:
        """Validation metrics (may be empty); called every `eval_every` steps and at the end."""

    def save(self, model: nn.Module, folder: Path) -> None:
        """Write the model's trained parts to `folder` (a loadable model checkpoint)."""

    def load_trained(self, model: nn.Module, folder: Path) -> None:
        """Load what `save` wrote into `model` (used to resume)."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def lr_groups(model: nn.Module, tower: nn.Module, tower_lr_scale: float) -> list[dict]:
    """The optimizer's parameter groups of `model`'s trained parameters: those of the vision `tower`
    at `tower_lr_scale` of the lr (a pretrained tower should move less than the fresh adapter beside
    it), the rest at the full lr; empty groups left out."""
    in_tower = {id(p) for p in tower.parameters()}
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if id(p) not in in_tower], "lr_scale": 1.0},
              {"params": [p for p in trained if id(p) in in_tower], "lr_scale": tower_lr_scale}]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def validation_loss(stage: Stage, model: nn.Module, val_set, batch_size: int, max_batches: int) -> dict[str, float]:
    """{"val_loss": the mean of `stage.step`'s loss over the first `max_batches` batches of `val_set`}
    ({} without a validation set), in eval mode; the model is back in train mode afterwards."""
    if not val_set:
        return {}
    model.eval()
    losses = []
    for start in range(0, min(len(val_set), max_batches * batch_size), batch_size):
        batch = to_device(stage.collate(val_set[start: start + batch_size]), model.device)
        losses.append(float(stage.step(model, batch).loss))
    model.train()
    return {"val_loss": sum(losses) / len(losses)}
