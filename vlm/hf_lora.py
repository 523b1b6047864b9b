"""LoRA and QLoRA adapters on transformers image-text-to-text models, and the run folder that holds one.

Training (train/hf_instruct.py), the commands that load a model (chat, serve and eval through
vlm.hf_assistant) and `medvlm export --merge` all read and write the folder through this module, so
there is one definition of it. The training loop is not here.

Which layers get LoRA is read from the model's structure, never from its name: the language model is
what `get_decoder()` returns (model.language_model in llava, gemma3 and qwen2_5_vl, model.text_model in
idefics3), the vision tower is what `get_encoder(modality="image")` returns, and the projector is what
else the inner model holds beside those two (llava's and gemma3's multi_modal_projector, idefics3's
connector; Qwen2.5-VL's merger sits inside its vision tower and trains with it).

A run folder (RUN/final/, and the model/ of each resumable checkpoint):

    adapter_config.json         peft's own format: PeftModel.from_pretrained(base, RUN/final) is the
    adapter_model.safetensors   trained model. A vision tower or projector trained in full is stored
                                in it as peft `modules_to_save`.
    config.json                 {"medvlm_kind": "transformers-lora", "base_model", "base_revision",
                                "quantization", "dtype", "lora": {...}}. It has no "model_type" key, so
                                no tool mistakes the folder for a transformers model.
    MODEL_CARD.md

Training never changes the processor (it adds no tokens and leaves the template alone), so the run uses
the base's processor and the folder holds none.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlm.errors import CheckpointError, ConfigError, ModelSourceError
from vlm.fileio import atomic_folder, folder_digest
from vlm.sources import LORA_RUN_KIND, Source, hub_hint, is_lora_run_folder, resolve_transformers

LANGUAGE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_MODES = ("frozen", "lora", "full")
PROJECTOR_MODES = ("frozen", "full")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

CARD = """# {name}

A LoRA adapter (peft) on `{base}` ({quantization}, {dtype}), trained with `medvlm train instruct`.
Load it with `--model {name}`, or merge it into a plain transformers folder with `medvlm export --merge`.

**Research use only. Not a medical device.** Its answers can be wrong and must be reviewed by a
qualified clinician.
"""


@dataclass(frozen=True)
class LoraSettings:
    """What trains: LoRA of rank `r` on the language model's `targets`; the vision tower frozen, with
    LoRA on its linear layers, or in full; the projector frozen or in full."""

    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = LANGUAGE_TARGETS
    vision: str = "frozen"
    projector: str = "frozen"

    def validate(self) -> "LoraSettings":
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.targets:
            raise ConfigError("LoRA needs r >= 1, alpha > 0, dropout in [0, 1) and at least one target.")
        if self.vision not in VISION_MODES or self.projector not in PROJECTOR_MODES:
            raise ConfigError(f"vision must be one of {', '.join(VISION_MODES)} and projector one of "
                              f"{', '.join(PROJECTOR_MODES)}; got {self.vision!r}, {self.projector!r}.")
        return self


@dataclass(frozen=True)
class RunConfig:
    """The run folder's config.json: the base the adapter belongs to and how it was loaded."""

    base_model: str
    base_revision: str | None
    quantization: str
    dtype: str
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_json(self) -> dict:
        return {"medvlm_kind": LORA_RUN_KIND, **asdict(self), "lora": {**asdict(self.lora),
                                                                         "targets": list(self.lora.targets)}}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "RunConfig":
        try:
            lora = LoraSettings(**{**data["lora"], "targets": tuple(data["lora"]["targets"])}).validate()
            run = cls(data["base_model"], data["base_revision"], data["quantization"], data["dtype"], lora)
        except (KeyError, TypeError, ConfigError) as e:
            raise CheckpointError(f"{where}: not a valid LoRA run config ({e}).") from None
        if run.quantization not in QUANTIZATIONS or run.dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown quantization {run.quantization!r} or dtype {run.dtype!r}.")
        return run


@dataclass(frozen=True)
class ModelParts:
    """Module paths of a transformers VLM's language model, vision tower and projectors."""

    language: str
    vision: str | None
    projectors: tuple[str, ...]
    output_embeddings: str | None


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of `model` (a bare transformers model, not a peft one), found from its structure."""
    names = {id(module): name for name, module in model.named_modules()}
    decoder, vision = model.get_decoder(), model.get_encoder(modality="image")
    if decoder is model or id(decoder) not in names:
        raise ConfigError(f"{type(model).__name__}: cannot find its language model (get_decoder).")
    language = names[id(decoder)]
    vision_path = names.get(id(vision)) if vision is not model else None
    inner_path = language.rpartition(".")[0]
    inner = model.get_submodule(inner_path) if inner_path else model
    projectors = tuple(f"{inner_path}.{name}".lstrip(".") for name, child in inner.named_children()
                       if child is not decoder and child is not vision and any(True for _ in child.parameters()))
    head = model.get_output_embeddings()
    return ModelParts(language, vision_path, projectors, names.get(id(head)) if head is not None else None)


def lora_config(model: nn.Module, lora: LoraSettings):
    """The peft LoraConfig of `lora` for `model`: a regex over the language model's target layers
    (and the vision tower's linear layers with vision=lora), modules_to_save for parts trained in full."""
    from peft import LoraConfig

    parts = model_parts(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    in_language = {name.rsplit(".", 1)[-1] for name in linear if name.startswith(parts.language + ".")}
    missing = [t for t in lora.targets if t not in in_language]
    if missing:
        raise ConfigError(f"LoRA targets {missing} are not linear layers of the language model ({parts.language}); "
                          f"it has {', '.join(sorted(in_language))}.")
    patterns = [rf"{re.escape(parts.language)}\..*\.(?:{'|'.join(map(re.escape, lora.targets))})"]
    if lora.vision == "lora":
        patterns += [re.escape(name) for name in linear if name.startswith(f"{_required(parts.vision, 'vision')}.")]
    full = [_required(parts.vision, "vision")] if lora.vision == "full" else []
    if lora.projector == "full":
        if not parts.projectors:
            raise ConfigError(f"{type(model).__name__} has no projector beside its vision tower ({parts.vision}); "
                              "train it with vision=lora or vision=full.")
        full += list(parts.projectors)
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                      target_modules="|".join(f"(?:{p})" for p in patterns), modules_to_save=full or None)


def _required(path: str | None, part: str) -> str:
    if path is None:
        raise ConfigError(f"this model has no {part} tower to train.")
    return path


def attach_lora(model: nn.Module, lora: LoraSettings):
    """`model` wrapped by peft with a fresh adapter per `lora`; exactly the adapter (and the parts
    trained in full) require grad. Trained weights are kept in float32 whatever the base's dtype."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(model, lora.validate()))
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # modules_to_save copies come in the base's dtype
    return peft_model


# ---- the base model ---------------------------------------------------------------------------------------

def quantization_config(quantization: str, compute_dtype: torch.dtype, skip: tuple[str, ...] | None = None):
    """bitsandbytes settings: 8bit, or 4bit NF4 with double quantization computing in `compute_dtype`;
    `skip` names the modules to leave unquantized (None: transformers' default, the output layer)."""
    from transformers import BitsAndBytesConfig

    skip_modules = [re.escape(name) for name in skip] if skip is not None else None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def beside_language(location: str, **load) -> tuple[str, ...]:
    """Every part of the model in `location` outside its language model (vision tower, projectors,
    output layer), read from an empty (meta-device) copy: QLoRA quantizes the language model only, so
    the vision side can train (LoRA or in full) and keeps its precision."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(location, **load)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=load.get("trust_remote_code"))
    parts = model_parts(skeleton)
    return tuple(p for p in (parts.vision, *parts.projectors, parts.output_embeddings) if p)


def load_base(reference: str, *, dtype: str, quantization: str = "none", device_map=None, revision: str | None = None,
              trust_remote_code: bool = False, language_only: bool = True):
    """(model, processor, source) of the transformers model `reference` names (hf:ORG/NAME or a
    folder), in `dtype`; with quantization its language model alone is 4- or 8-bit (beside_language),
    or, with `language_only=False` (inference), every linear layer but transformers' default exceptions."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES or quantization not in QUANTIZATIONS:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} and quantization one of "
                          f"{', '.join(QUANTIZATIONS)}; got {dtype!r}, {quantization!r}.")
    if is_lora_run_folder(Path(reference)):
        raise ConfigError(f"{reference} is a LoRA run, not a base model: merge it first (medvlm export --merge "
                          f"{reference} OUT) and train on OUT.")
    source = resolve_transformers(reference)
    load = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs = {**load, "dtype": DTYPES[dtype], "device_map": device_map or {"": "cpu"}}
    try:
        if quantization != "none":
            skip = beside_language(source.location, **load) if language_only else None
            kwargs["quantization_config"] = quantization_config(quantization, DTYPES[dtype], skip)
        processor = AutoProcessor.from_pretrained(source.location, **load)
        model = AutoModelForImageTextToText.from_pretrained(source.location, **kwargs)
    except OSError as e:  # not on disk, not reachable on the hub: one line, no traceback
        raise ModelSourceError(load_failure(source, e)) from None
    return model, processor, source


def default_dtype(device) -> str:
    """bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slow and fp16 is never used)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a reply: the generation config's eos_token_id(s) and the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids | {tokenizer.eos_token_id} if i is not None}


def base_revision(model, source: Source) -> str | None:
    """The hub commit the model was loaded at, or the sha256 digest of its local folder."""
    if source.kind == "hub":
        return getattr(model.config, "_commit_hash", None)
    return folder_digest(source.location)


def load_failure(source: Source, error: OSError) -> str:
    """The one-line message for a transformers model that could not be loaded."""
    if source.kind == "hub":
        return f"Model source {source.reference!r}: {hub_hint(source.location)}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"Model source {source.reference!r}: cannot load the transformers model in {source.location} ({first[:200]})."


# ---- the run folder -------------------------------------------------------------------------------------

def write_run(folder: str | Path, model, run: RunConfig) -> Path:
    """Write the peft adapter of `model`, config.json and MODEL_CARD.md to `folder`, atomically."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        # save_embedding_layers=False: peft's "auto" would look the base up (on the hub) to compare vocabularies
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's blank hub card; MODEL_CARD.md says what this is
        (tmp / "config.json").write_text(json.dumps(run.to_json(), indent=2) + "\n")
        (tmp / "MODEL_CARD.md").write_text(CARD.format(name=folder.name, base=run.base_model,
                                                       quantization=run.quantization, dtype=run.dtype))
    return folder


def read_run(folder: str | Path) -> RunConfig:
    """The RunConfig of a run folder; CheckpointError if it is not one."""
    folder = Path(folder)
    if not is_lora_run_folder(folder):
        raise CheckpointError(f"{folder} is not a LoRA run folder (config.json with medvlm_kind "
                              f"{LORA_RUN_KIND!r} beside adapter_config.json).")
    return RunConfig.from_json(json.loads((folder / "config.json").read_text()), where=str(folder))


def load_adapter_weights(model, folder: str | Path) -> None:
    """Load a run folder's adapter weights into a peft model holding the same adapter (to resume)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    try:
        result = set_peft_model_state_dict(model, load_file(str(path)))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the adapter {path}: {e}") from e
    if result.unexpected_keys:
        raise CheckpointError(f"adapter {path} does not match the model: {result.unexpected_keys[:3]}")


def load_run(folder: str | Path, *, device: str = "cpu", dtype: str | None = None, quantization: str | None = None,
             device_map=None, trust_remote_code: bool = False):
    """(peft model in eval mode, processor, run config) of a run folder: its base loaded as trained
    (quantization, dtype) unless overridden, at the hub commit it was trained on; a base whose
    revision differs from the recorded one is refused (CheckpointError), as the adapter would not fit it."""
    from peft import PeftModel

    folder = Path(folder)
    run = read_run(folder)
    commit = run.base_revision if run.base_revision and re.fullmatch(r"[0-9a-f]{40}", run.base_revision) else None
    model, processor, source = load_base(run.base_model, dtype=dtype or run.dtype,
                                         quantization=quantization or run.quantization,
                                         device_map=device_map or {"": str(device)}, revision=commit,
                                         trust_remote_code=trust_remote_code)
    found = base_revision(model, source)
    if run.base_revision and found and found != run.base_revision:
        raise CheckpointError(f"{folder} was trained on {run.base_model} at {run.base_revision}, but that base is "
                              f"now {found}; restore the base it was trained on.")
    return PeftModel.from_pretrained(model, str(folder)).eval(), processor, run


def merge_run(folder: str | Path, out: str | Path, dtype: str | None = None, device: str = "cpu") -> Path:
    """Write a plain transformers folder (safetensors, config, processor, generation config) holding
    the base with the adapter merged in. The base is loaded unquantized even for a QLoRA run: a merged
    4-bit model would have to be re-quantized, and vLLM and from_pretrained want full weights."""
    folder, out = Path(folder), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder.")
    model, processor, run = load_run(folder, device=device, dtype=dtype, quantization="none")
    merged = model.merge_and_unload()
    with atomic_folder(out) as tmp:
        merged.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / "MODEL_CARD.md").write_text(
            f"# {out.name}\n\n`{run.base_model}` with the LoRA adapter {folder} ({folder_digest(folder)}) merged in.\n\n"
            "**Research use only. Not a medical device.**\n")
    return out
