"""Instruction tuning of a transformers image-text-to-text model (MedGemma, Qwen2.5-VL, llava-hf,
SmolVLM, ...) with LoRA or QLoRA, as a stage of the one training loop (train/loop.py).

`medvlm train instruct --model hf:ORG/NAME|FOLDER` selects it (train/cli.py). LoRA goes on the language
model's projections, found from the model's structure (vlm/hf_lora.py); the vision tower can get LoRA
too or train in full, and so can the projector. QLoRA (`quantization: 4bit`) loads the language model in
NF4 with double quantization, computing in the stage's dtype, and goes through peft's
prepare_model_for_kbit_training with gradient checkpointing. Labels come from the model's own chat
template (train/hf_labels.py). The run folder is vlm/hf_lora.py's, loadable with `--model RUN/final`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


from train.data import ConversationRecord, load_conversations
from train.hf_labels import ConversationEncoder
from train.loop import process_device
from train.stage import StepStats, lr_groups, validation_loss
from vlm.errors import ConfigError
from vlm.hf_lora import LANGUAGE_TARGETS, LoraSettings, RunConfig, attach_lora, base_revision, load_adapter_weights
from vlm.hf_lora import default_dtype, eos_ids, load_base, read_run, write_run
from vlm.imaging import load_image


@dataclass(frozen=True)
class HFInstructConfig:
    model: str = ""
    """The base: hf:ORG/NAME or a folder with a transformers image-text-to-text model and its processor."""
    revision: str = ""
    """Hub revision (branch, tag or commit) of the base; the commit loaded is recorded in the run."""
    train_data: str = ""
    """LLaVA conversations JSON (one `<image>` marker per image, in a user turn)."""
    val_data: str = ""
    """Validation conversations in the same format (optional)."""
    quantization: str = "none"
    """none (LoRA on the base in `dtype`) or 4bit (QLoRA: the language model in NF4)."""
    dtype: str = "auto"
    """bfloat16, float32 or auto (bfloat16 on a GPU, float32 on the CPU): the weights' dtype, and the
    4-bit layers' compute dtype."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scale numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input."""
    lora_targets: str = ",".join(LANGUAGE_TARGETS)
    """Comma-separated names of the language model's linear layers that get LoRA."""
    vision: str = "frozen"
    """The vision tower: frozen, lora (LoRA on its linear layers) or full (all its weights train)."""
    projector: str = "frozen"
    """The projector between tower and language model: frozen or full."""
    vision_lr_scale: float = 0.2
    """The vision tower's learning rate as a fraction of the stage's (when it trains)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third slower); always on with 4bit."""
    max_length: int = 2048
    """Conversations longer than this many tokens (image tokens included) are refused as bad records."""
    val_batches: int = 20
    """At most this many validation batches per evaluation."""
    trust_remote_code: bool = False
    """Run the base repository's own Python code (off unless you ask: read it first)."""

    def lora(self) -> LoraSettings:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets, self.vision,
                            self.projector).validate()


class HFInstructStage:
    name = "instruct"

    def __init__(self, cfg: HFInstructConfig, train_batch: int, skip_bad: bool, device: str = "auto"):
        if not cfg.model:
            raise ConfigError("give the base model: --model hf:ORG/NAME or a folder.")
        if cfg.quantization not in ("none", "4bit"):
            raise ConfigError(f"quantization must be none or 4bit (QLoRA), got {cfg.quantization!r}.")
        if not 0 < cfg.vision_lr_scale <= 1:
            raise ConfigError(f"vision_lr_scale must be in (0, 1], got {cfg.vision_lr_scale}.")
        self.cfg, self.lora = cfg, cfg.lora()
        self.train_batch, self.skip_bad, self.device = train_batch, skip_bad, device
        self.model = self.encoder = self.run = None

    # -- model -----------------------------------------------------------------------------------
    def build_model(self):
        cfg = self.cfg
        device = process_device(self.device)
        dtype = cfg.dtype if cfg.dtype != "auto" else default_dtype(device)
        model, processor, source = load_base(cfg.model, dtype=dtype, quantization=cfg.quantization,
                                             device_map={"": str(device)}, revision=cfg.revision or None,
                                             trust_remote_code=cfg.trust_remote_code)
        base = cfg.model if source.kind == "hub" else source.location  # a folder by its absolute path
        self.run = RunConfig(base, base_revision(model, source), cfg.quantization, dtype, self.lora)
        self.encoder = ConversationEncoder(processor, eos_ids(model, processor.tokenizer))
        self.model = attach_lora(prepare_for_training(model, cfg), self.lora)
        return self.model

    def param_groups(self, model) -> list[dict]:
        """The vision tower's trained weights at `vision_lr_scale` of the lr, the rest at the full lr."""
        vision = model.get_base_model().get_encoder(modality="image")
        return lr_groups(model, vision, self.cfg.vision_lr_scale)

    # -- data ------------------------------------------------------------------------------------
    def datasets(self):
        train = self._load(self.cfg.train_data)
        return train, self._load(self.cfg.val_data) if self.cfg.val_data else None

    def _load(self, path: str) -> list[ConversationRecord]:
        if not path:
            raise ConfigError("give the training conversations: --train-data conv.json.")
        return load_conversations(path, self.skip_bad, check_image=load_image, measure=self.record_length,
                                  max_length=self.cfg.max_length)

    def _encode(self, record: ConversationRecord):
        images = [load_image(path).to_pil() for path in record.images]
        return self.encoder.encode(list(record.messages), images)

    def record_length(self, record: ConversationRecord) -> int:
        """Tokens of the conversation, image tokens included (measured once, at loading)."""
        return record.length if record.length is not None else len(self._encode(record).input_ids)

    def collate(self, records: list[ConversationRecord]) -> dict:
        return self.encoder.batch([self._encode(r) for r in records])

    # -- training --------------------------------------------------------------------------------
    def step(self, model, batch: dict) -> StepStats:
        out = model(**batch)
        return StepStats(out.loss, samples=batch["input_ids"].shape[0], tokens=int(batch["attention_mask"].sum()))

    def evaluate(self, model, val_set) -> dict[str, float]:
        return validation_loss(self, model, val_set, self.train_batch, self.cfg.val_batches)

    def save(self, model, folder: Path) -> None:
        write_run(folder, model, self.run)

    def load_trained(self, model, folder: Path) -> None:
        saved = read_run(folder)
        if saved.lora != self.lora or saved.base_model != self.run.base_model:
            raise ConfigError(f"{folder} was trained with other settings ({saved.base_model}, {saved.lora}); "
                              "resume with the same ones or give another --out.")
        load_adapter_weights(model, folder)


def prepare_for_training(model, cfg: HFInstructConfig):
    """Freeze the base. 4bit: peft's kbit preparation (non-quantized weights to float32, gradient
    checkpointing) after turning off bitsandbytes' CPU repacking of 4-bit weights: on CPUs with
    AVX512-BF16 a no-grad forward (generate, evaluation) repacks them into a layout without a backward,
    and LoRA gradients silently become None."""
    if cfg.quantization == "4bit":
        from peft import prepare_model_for_kbit_training

        from vlm.language import disable_cpu_weight_repacking

        disable_cpu_weight_repacking(model)
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model

