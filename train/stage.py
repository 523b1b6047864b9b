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
