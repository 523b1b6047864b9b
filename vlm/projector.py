"""The projector: vision tokens -> LLM embedding space, with optional average pooling of the grid."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ProjectorConfig


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int], has_cls: bool):
        super().__init__()
        self.cfg, self.grid, self.has_cls = cfg, grid, has_cls
        # Identity has no weights, so checkpoints saved without a norm load unchanged
        self.norm = nn.LayerNorm(in_dim) if cfg.input_norm == "layernorm" else nn.Identity()
        if cfg.kind == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim))
        else:  # mlp2x_gelu, as in LLaVA-1.5
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def num_output_tokens(self) -> int:
        h, w = (-(-n // self.cfg.pool) for n in self.grid)  # ceil: pooling keeps the ragged edge
        return h * w + int(self.has_cls)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, D] (class token first if has_cls) -> [B, M, out_dim]."""
        if self.cfg.pool > 1:
            tokens = self._pool(tokens)
        return self.net(self.norm(tokens.to(self.net[0].weight.dtype)))

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        cls, patches = (tokens[:, :1], tokens[:, 1:]) if self.has_cls else (None, tokens)
        b, n, d = patches.shape
        h, w = self.grid
        grid = patches.transpose(1, 2).reshape(b, d, h, w)
        k = self.cfg.pool
        pooled = F.avg_pool2d(grid, kernel_size=k, stride=k, ceil_mode=True).flatten(2).transpose(1, 2)
        return pooled if cls is None else torch.cat([cls, pooled], dim=1)
