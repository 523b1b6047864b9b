"""Save and load a MedVLM checkpoint folder.

    config.json            MedVLMConfig; frozen bases are source strings, not copies
    projector.safetensors  always
    vision.safetensors     when the vision tower was trained or built from scratch
    adapter/               the peft LoRA adapter, when there is one
    MODEL_CARD.md

Writes go to a temporary folder that is renamed into place, so an interrupted save never leaves
a half-written checkpoint under the final name. Loading reads safetensors only: nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlm.config import MedVLMConfig
from vlm.fileio import atomic_folder
from vlm.errors import CheckpointError, ConfigError, ModelSourceError
from vlm.sources import resolve

DEFAULT_CARD = """# {name}

A medvlm checkpoint. Vision tower: `{vision}`; LLM: `{language}` ({quantization}).

**Research use only. Not a medical device.** Its answers can be wrong and must be reviewed by a
qualified clinician.
"""


def save_checkpoint(model, folder: str | Path, card: str | None = None) -> Path:
    """Write `model`'s config and trained parts to `folder` atomically; return the folder."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        write_checkpoint_files(model, tmp, card)
    return folder


def write_checkpoint_files(model, folder: Path, card: str | None = None) -> None:
    config: MedVLMConfig = model.config
    config.save(folder / "config.json")
    for part, state in model.trainable_state().items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / f"{part}.safetensors"))
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(str(folder / "adapter"))
    text = card or DEFAULT_CARD.format(
        name=folder.name, vision=config.vision.source or "built from scratch",
        language=config.language.source, quantization=config.language.quantization,
    )
    (folder / "MODEL_CARD.md").write_text(text)


def load_checkpoint(reference: str, device: str | torch.device = "cpu", lora_trainable: bool = False,
                    **language_overrides):
    """Load a checkpoint folder (a path or `demo`); `language_overrides` change e.g. quantization."""
    from vlm.model import MedVLM

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
    model = MedVLM.build(config, device=device, adapter_dir=adapter if adapter.is_dir() else None,
                         lora_trainable=lora_trainable)
    load_trained_parts(model, folder, adapter=False)
    return model


def load_trained_parts(model, folder: str | Path, adapter: bool = True) -> None:
    """Load a checkpoint's projector, vision tower and (with `adapter`) LoRA weights into a built model."""
    folder = Path(folder)
    _load_part(model.projector, folder / "projector.safetensors", required=True)
    needs_vision = model.config.vision.trainable or model.config.vision.arch is not None
    _load_part(model.vision.visual, folder / "vision.safetensors", required=needs_vision)
    weights = folder / "adapter" / "adapter_model.safetensors"
    if adapter and weights.is_file():
        from peft import set_peft_model_state_dict

        try:
            result = set_peft_model_state_dict(model.llm, load_file(str(weights)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {weights} cannot be loaded: {e}") from e
        if result.unexpected_keys:
            raise CheckpointError(f"checkpoint file {weights} does not match the model: {result.unexpected_keys[:3]}")


def _checkpoint_folder(reference: str) -> Path:
    source = resolve(reference)
    if source.kind == "hub":
        raise ModelSourceError(f"{reference!r}: medvlm checkpoints are loaded from a local folder or 'demo'; no folder of that name exists.")
    folder = Path(source.location)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a medvlm checkpoint: it has no config.json.")
    return folder


def _load_part(module: torch.nn.Module, path: Path, required: bool) -> None:
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
