"""What the align and instruct stages share: a MedVLM trained with next-token loss on assistant
tokens, fed conversations. They differ only in which parts train and which data they read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


from train.data import ConversationRecord, load_conversations, load_pairs
from train.stage import StepStats, lr_groups, validation_loss
from vlm.config import MedVLMConfig, VisionConfig
from vlm.errors import ConfigError
from vlm.imaging import load_image


@dataclass(frozen=True)
class VLMStageConfig:
    train_data: str = ""
    """Training data: image-text pairs JSONL (align) or LLaVA conversations JSON (instruct)."""
    val_data: str = ""
    """Validation data in the same format (optional)."""
    init: str = ""
    """Checkpoint folder to start from; empty builds a fresh model from the config's `model:` section."""
    vision_from: str = ""
    """A `medvlm train clip` output folder whose trained image tower replaces the model's."""
    caption_prompt: str = "<image>\nDescribe the image briefly."
    """User turn paired with each caption when training on image-text pairs."""
    vision_lr_scale: float = 0.2
    """The trained vision tower's learning rate, as a fraction of the stage's: a pretrained tower
    should move less than the fresh adapter and projector beside it."""
    val_batches: int = 20
    """At most this many validation batches per evaluation."""


def with_clip_tower(config: MedVLMConfig, clip_vision: VisionConfig) -> MedVLMConfig:
    """`config` with the image tower a clip stage trained: its architecture replaces the config's
    (not merged into it: a ViT's keys must not linger beside a timm trunk's), while the config keeps
    how the tower is used (feature_layer, keep_cls, image_size, trainable)."""
    vision = dataclasses.replace(config.vision, source="", arch=clip_vision.arch)
    return dataclasses.replace(config, vision=vision).validate()


class VLMStage:
    name = "vlm"

    def __init__(self, cfg: VLMStageConfig, model_config: MedVLMConfig, train_batch: int, skip_bad: bool,
                 model_changes: dict | None = None):
        """`model_config` builds a fresh model; `model_changes` (MedVLMConfig fields as a nested dict:
        the stage's own `model:` section and the `--model.*` options) apply to an `init` checkpoint's."""
        self.cfg, self.model_config, self.model_changes = cfg, model_config, model_changes or {}
        self.train_batch, self.skip_bad = train_batch, skip_bad
        self.model = None

    # -- model -----------------------------------------------------------------------------------
    def build_model(self):
        from vlm.model import MedVLM

        if self.cfg.init and self.cfg.vision_from:
            raise ConfigError("vision_from starts a fresh model; the init checkpoint already has its tower.")
        if self.cfg.init:
            model = self._from_init()
        else:
            config, state = self.model_config, None
            if self.cfg.vision_from:
                from train.clip import vision_from_clip

                vision, state = vision_from_clip(self.cfg.vision_from)
                config = with_clip_tower(config, vision)
            model = MedVLM.build(config)
            if state is not None:
                model.vision.visual.load_state_dict(state)
        self.model = self.configure(model)
        return self.model

    def _from_init(self):
        """The `init` checkpoint with the model changes that can apply to trained weights: the LLM's
        quantization and dtype (as at loading for every command), the LoRA fields of a fresh adapter
        (used only where the checkpoint has none) and whether the tower trains."""
        from vlm.model import MedVLM
        from vlm.options import LANGUAGE_OVERRIDES

        language, vision = self.model_changes.get("language", {}), self.model_changes.get("vision", {})
        loading = {k: v for k, v in language.items() if k in LANGUAGE_OVERRIDES}
        lora = {k: v for k, v in language.items() if k.startswith("lora_")}
        fixed = sorted({k for k in self.model_changes if k not in ("language", "vision")}
                       | {f"language.{k}" for k in set(language) - set(loading) - set(lora)}
                       | {f"vision.{k}" for k in vision if k != "trainable"})
        if fixed:
            raise ConfigError(f"init {self.cfg.init}: the checkpoint's model keeps its {', '.join(fixed)}; only "
                              f"language {', '.join(LANGUAGE_OVERRIDES)}, the LoRA fields and vision.trainable change.")
        model = MedVLM.from_pretrained(self.cfg.init, lora_trainable=True, **loading)
        if lora and not hasattr(model.llm, "peft_config"):
            model.config = model.config.replace(language=lora)
        if vision:
            model.config = model.config.replace(vision=vision)
        return model

    def configure(self, model):
        """Set requires_grad for this stage; subclasses decide."""
        raise NotImplementedError

    def param_groups(self, model) -> list[dict]:
        """The optimizer's parameter groups: the vision tower's at `vision_lr_scale` of the lr."""
        if not 0 < self.cfg.vision_lr_scale <= 1:
            raise ConfigError(f"vision_lr_scale must be in (0, 1], got {self.cfg.vision_lr_scale}.")
        return lr_groups(model, model.vision, self.cfg.vision_lr_scale)

    # -- data ------------------------------------------------------------------------------------
    def datasets(self):
        train = self._load(self.cfg.train_data)
        val = self._load(self.cfg.val_data) if self.cfg.val_data else None
        return train, val

    def _load(self, path: str) -> list[ConversationRecord]:
        raise NotImplementedError

    def _pairs_as_conversations(self, path: str) -> list[ConversationRecord]:
        pairs = load_pairs(path, self.skip_bad, check_image=load_image)
        return [ConversationRecord((p.image,), ({"role": "user", "content": self.cfg.caption_prompt},
                                                 {"role": "assistant", "content": p.text}), p.source, p.line)
                for p in pairs]

    def _conversations(self, path: str) -> list[ConversationRecord]:
        return load_conversations(path, self.skip_bad, check_image=load_image, measure=self.record_length,
                                  max_length=self.model.config.max_length)

    def record_length(self, record: ConversationRecord) -> int:
        """Tokens in the encoded conversation, image tokens included (for group_by_length)."""
        if record.length is not None:  # measured when the file was loaded
            return record.length
        return len(self.model.processor.encode(list(record.messages)).input_ids)

    def collate(self, records: list[ConversationRecord]) -> dict:
        return collate_conversations(self.model, records)

    # -- training --------------------------------------------------------------------------------
    def step(self, model, batch: dict) -> StepStats:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
        return StepStats(out.loss, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))

    def evaluate(self, model, val_set) -> dict[str, float]:
        return validation_loss(self, model, val_set, self.train_batch, self.cfg.val_batches)

    def save(self, model, folder: Path) -> None:
        model.save_pretrained(folder)

    def load_trained(self, model, folder: Path) -> None:
        model.load_trained_parts(folder)


def collate_conversations(model, records: list[ConversationRecord]) -> dict:
    """The records' images read from disk, and the processor's right-padded training batch of them."""
    images = [[load_image(path).to_pil() for path in r.images] for r in records]
    return model.processor.training_batch([list(r.messages) for r in records], images)
