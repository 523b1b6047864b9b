"""Read and write the parts of a MedVLM checkpoint folder; `MedVLM.save_pretrained` and
`MedVLM.from_pretrained` assemble them (this module never imports the model).

    config.json            MedVLMConfig; frozen bases are source strings, not copies
    projector.safetensors  always
    vision.safetensors     when the vision tower was trained or built from scratch
    adapter/               the peft LoRA adapter, when there is one
    MODEL_CARD.md

Writes go to a temporary folder that is renamed into place (vlm.fileio.atomic_folder), so an
interrupted save never leaves a half-written checkpoint under the final name. Loading reads
safetensors only: nothing is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlm.config import MedVLMConfig
from vlm.errors import CheckpointError, ConfigError, ModelSourceError
from vlm.fileio import atomic_folder
from vlm.sources import resolve

DEFAULT_CARD = """# {name}

A medvlm checkpoint. Vision tower: `{vision}`; LLM: `{language}` ({quantization}).

**Research use only. Not a medical device.** Its answers can be wrong and must be reviewed by a
qualified clinician.
"""


def stored_parts(config: MedVLMConfig) -> tuple[str, ...]:
    """The parts a checkpoint of `config` stores as `<part>.safetensors`: the projector always, the
    vision tower when it is not a frozen hub base (trained, or built from scratch from an `arch`)."""
    if config.vision.trainable or config.vision.arch is not None:
        return ("projector", "vision")
    return ("projector",)


@dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder whose config.json was read and checked against its adapter/."""
    folder: Path
    config: MedVLMConfig

    @property
    def adapter_dir(self) -> Path | None:
        adapter = self.folder / "adapter"
        return adapter if adapter.is_dir() else None


def write_checkpoint(folder: str | Path, config: MedVLMConfig, parts: dict[str, dict[str, torch.Tensor]],
                     adapter=None, card: str | None = None) -> Path:
    """Write config.json, `parts` (name -> state dict), the peft `adapter` (a model with
    `save_pretrained`, or None) and MODEL_CARD.md to `folder` atomically; return the folder."""
    folder = Path(folder)
    expected = set(stored_parts(config))
    if set(parts) != expected:
        raise CheckpointError(f"checkpoint {folder}: parts {sorted(parts)} given, {sorted(expected)} expected.")
    with atomic_folder(folder) as tmp:
        config.save(tmp / "config.json")
        for part, state in parts.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{part}.safetensors"))
        if adapter is not None:
            adapter.save_pretrained(str(tmp / "adapter"))
        text = card or DEFAULT_CARD.format(
            name=folder.name, vision=config.vision.source or "built from scratch",
            language=config.language.source, quantization=config.language.quantization,
        )
        (tmp / "MODEL_CARD.md").write_text(text)
    return folder


def open_checkpoint(reference: str, **language_overrides) -> CheckpointFolder:
    """Find a checkpoint folder (a path or `demo`) and read its config; `language_overrides` change
    e.g. quantization. A config with LoRA needs the folder's adapter/."""
    folder = _checkpoint_folder(reference)
    try:
        config = MedVLMConfig.load(folder / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from e
    if language_overrides:
        config = config.replace(language=language_overrides)
    adapter = folder / "adapter"
    if config.language.lora_r > 0 and not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"checkpoint {folder}: config has LoRA (rank {config.language.lora_r}) but adapter/ is missing.")
    return CheckpointFolder(folder, config)


def load_parts(folder: str | Path, config: MedVLMConfig, modules: dict[str, torch.nn.Module]) -> None:
    """Load `<name>.safetensors` into each of `modules` (name -> module); the parts `config` stores
    must be there, the others are loaded when present."""
    folder = Path(folder)
    required = stored_parts(config)
    for name, module in modules.items():
        load_part(module, folder / f"{name}.safetensors", required=name in required)


def load_adapter_weights(llm: torch.nn.Module, folder: str | Path) -> None:
    """Load a checkpoint's LoRA weights (adapter/adapter_model.safetensors, if any) into a peft model."""
    weights = Path(folder) / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        return
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(llm, load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {weights} cannot be loaded: {e}") from e
    if result.unexpected_keys:
        raise CheckpointError(f"checkpoint file {weights} does not match the model: {result.unexpected_keys[:3]}")


def load_part(module: torch.nn.Module, path: Path, required: bool) -> None:
    """Load one safetensors file into `module`, whose keys and shapes it must match exactly; a
    missing file is an error when `required`, else nothing is loaded."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"checkpoint file {path} is missing.")
        return
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint file {path} is damaged: {e}") from e
    current = module.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    wrong = [k for k in current if k in state and state[k].shape != current[k].shape]
    if missing or unexpected or wrong:
        detail = f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        raise CheckpointError(f"checkpoint file {path} does not match its config.json: {detail}.")
    module.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()})


def _checkpoint_folder(reference: str) -> Path:
    source = resolve(reference)
    if source.kind == "hub":
        raise ModelSourceError(f"{reference!r}: medvlm checkpoints are loaded from a local folder or 'demo'; no folder of that name exists.")
    folder = Path(source.location)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a medvlm checkpoint: it has no config.json.")
    return folder
