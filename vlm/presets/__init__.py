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
    if overrides is None:
        return data
    if not isinstance(overrides, dict):
        raise ConfigError(f"model overrides of preset {name!r} must be a mapping, got {type(overrides).__name__}.")
    merged = dict(data)
    for key, value in overrides.items():
        base = merged.get(key)
        merged[key] = {**base, **value} if isinstance(base, dict) and isinstance(value, dict) else value
    return merged


def load_model_preset(name: str, overrides: dict | None = None) -> MedVLMConfig:
    """The MedVLMConfig of preset `name` (with `overrides`, see model_preset_data), validated."""
    return from_dict(MedVLMConfig, model_preset_data(name, overrides), where=f"preset {name}.model")
