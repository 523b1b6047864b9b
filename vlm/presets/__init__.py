"""Model presets: named MedVLMConfigs shipped as data, one `NAME.yaml` here holding a `model:`
mapping (like open_clip's model_configs). `medvlm init --preset NAME` builds one; a training
recipe names one with `model_preset: NAME` and may override some of its fields under `model:`.
"""

from __future__ import annotations

from importlib import resources

from vlm.config import MedVLMConfig, from_dict
from vlm.errors import ConfigError


def preset_names() -> list[str]:
    """The names of the shipped model presets, sorted."""
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".yaml"))


def model_preset_data(name: str, overrides: dict | None = None) -> dict:
    """The `model:` mapping of preset `name`, with `overrides` applied field by field: a section
    (vision, projector, language) is updated key by key, and a value that is itself a mapping
    (vision.arch) replaces the preset's whole, so no key of another architecture lingers."""
    import yaml

    path = resources.files(__package__) / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ConfigError(f"no model preset {name!r}; known presets: {', '.join(preset_names())}.")
    data = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return data if overrides is None else merge_model_fields(data, overrides, where=f"model overrides of preset {name!r}")


def merge_model_fields(base: dict, changes: dict, where: str = "model") -> dict:
    """MedVLMConfig fields `changes` over `base`: a section (vision, projector, language) is updated
    key by key, a mapping value inside it (vision.arch) replaced whole, as for a preset's overrides."""
    for mapping, name in ((base, "model"), (changes, where)):
        if not isinstance(mapping, dict):
            raise ConfigError(f"{name} must be a mapping of model fields, got {type(mapping).__name__}.")
    merged = dict(base)
    for key, value in changes.items():
        old = merged.get(key)
        merged[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


def load_model_preset(name: str, overrides: dict | None = None) -> MedVLMConfig:
    """The MedVLMConfig of preset `name` (with `overrides`, see model_preset_data), validated."""
    return from_dict(MedVLMConfig, model_preset_data(name, overrides), where=f"preset {name}.model")
