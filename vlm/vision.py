"""An open_clip image tower that returns patch tokens [B, N, D] from a chosen block, and its preprocessing.

Works for open_clip ViTs (BiomedCLIP, builtin ViT configs) and timm trunks (e.g. EfficientNet)
alike, through `forward_intermediates`, which both expose: a ViT gives its patch grid, a CNN its
last feature map; either is flattened row-major into tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vlm.config import VisionConfig
from vlm.errors import ModelSourceError
from vlm.sources import hub_hint, resolve

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    def __init__(self, visual: nn.Module, cfg: VisionConfig, mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__()
        self.visual = visual
        self.cfg = cfg
        size = getattr(visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():  # one dummy pass tells the grid and width, whatever the trunk
            grid, _ = self._feature_map(torch.zeros(1, 3, self.image_size, self.image_size))
        self.width = grid.shape[1]
        self.grid = tuple(grid.shape[-2:])
        self.num_tokens = self.grid[0] * self.grid[1] + int(cfg.keep_cls)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def _feature_map(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chosen block's output as a grid [B, D, H, W], and the class token [B, 1, D] if kept."""
        out = self.visual.forward_intermediates(
            pixel_values.to(self.dtype),
            indices=[self.cfg.feature_layer],
            stop_early=True,
            intermediates_only=True,
            output_fmt="NCHW",
            output_extra_tokens=self.cfg.keep_cls,
        )
        prefix = out.get("image_intermediates_prefix")
        return out["image_intermediates"][0], (prefix[0][:, :1] if self.cfg.keep_cls and prefix else None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (normalized) -> tokens [B, N, D], class token first if kept."""
        grid, cls = self._feature_map(pixel_values)
        tokens = grid.flatten(2).transpose(1, 2)
        return tokens if cls is None else torch.cat([cls, tokens], dim=1)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalized [B, 3, S, S]. The whole image is kept: the longest side is
        resized to S and the rest padded black (center-cropping could cut off a lung apex)."""
        batch = [letterbox(image, self.image_size) for image in images]
        return (torch.stack(batch) - self.mean) / self.std


def letterbox(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image -> [3, size, size] floats in [0, 1], not normalized: the longest side resized to
    `size` (bicubic), the image centered and the rest padded black."""
    image = image.convert("RGB")
    s = size
    scale = s / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (s, s))
    canvas.paste(image.resize((w, h), Image.Resampling.BICUBIC), ((s - w) // 2, (s - h) // 2))
    data = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return data.view(s, s, 3).permute(2, 0, 1).float() / 255.0


def build_visual(cfg: VisionConfig) -> tuple[nn.Module, tuple, tuple]:
    """The open_clip image tower named by cfg, with its normalization (mean, std)."""
    import open_clip

    if cfg.arch is not None:
        vision_cfg = dict(cfg.arch["vision_cfg"])
        if cfg.image_size:
            vision_cfg["image_size"] = cfg.image_size
        visual = open_clip.model._build_vision_tower(cfg.arch["embed_dim"], vision_cfg)
        pre = cfg.arch.get("preprocess_cfg", {})
        return visual, tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))
    name = open_clip_name(cfg.source)
    kwargs = {"force_image_size": cfg.image_size} if cfg.image_size else {}
    try:
        # pretrained_text=False: the text tower is dropped below and must not fetch BERT weights.
        model = open_clip.create_model(name, pretrained_text=False, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if name.startswith("hf-hub:"):
            raise ModelSourceError(f"vision tower {cfg.source!r}: {hub_hint(name[7:])}") from e
        raise ModelSourceError(f"vision tower {cfg.source!r}: open_clip cannot build it ({e}).") from e
    pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    return model.visual, tuple(pre.get("mean", OPENAI_MEAN)), tuple(pre.get("std", OPENAI_STD))


def open_clip_name(reference: str) -> str:
    """The name open_clip builds a tower from: a builtin architecture as is, `hf-hub:ID` for a hub
    source, `local-dir:PATH` for a folder with an open_clip_config.json."""
    import open_clip

    if reference in open_clip.list_models():
        return reference  # a builtin architecture, randomly initialized
    source = resolve(reference)
    if source.kind == "hub":
        return f"hf-hub:{source.location}"
    if not (Path(source.location) / "open_clip_config.json").is_file():
        raise ModelSourceError(f"vision tower {reference!r}: {source.location} has no open_clip_config.json.")
    return f"local-dir:{source.location}"


def load_vision_tower(cfg: VisionConfig) -> VisionTower:
    visual, mean, std = build_visual(cfg)
    tower = VisionTower(visual, cfg, mean, std)
    tower.eval().requires_grad_(cfg.trainable)
    return tower
