"""The model's fields as `medvlm train` options: `--model.language.lora-r 16`, `--model.vision.trainable`
(derived from MedVLMConfig), and the errors for fields that do not exist or cannot change."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train_fixtures import write_config, write_conversations, write_pairs
from vlm.cli import main
from vlm.errors import ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data")
    return {"align": write_pairs(folder), "instruct": write_conversations(folder)}


def _stage_from_cli(monkeypatch, argv):
    """The stage `medvlm train ...` would train, without training it."""
    import train.cli

    seen = {}

    def capture(stage, cfg, resume=True):
        seen["stage"] = stage
        return Path(cfg.out) / "final"

    monkeypatch.setattr(train.cli, "train", capture)
    assert main(argv) == 0
    return seen["stage"]


def test_prefixed_model_options_reach_the_built_model(data, tiny_llm_dir, tmp_path, monkeypatch):
    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    base = ["train", "instruct", "--config", str(config), "--train-data", str(data["instruct"]), "--out", str(tmp_path)]
    stage = _stage_from_cli(monkeypatch, base + ["--model.language.quantization", "8bit", "--model.max-length", "200"])
    # given fields change, the recipe's others stay (its instruct section's lora_r among them)
    assert stage.model_config.language.quantization == "8bit" and stage.model_config.max_length == 200
    assert stage.model_config.language.lora_r == 4 and stage.model_config.language.source == str(tiny_llm_dir)
    stage = _stage_from_cli(monkeypatch, base + ["--model.language.lora-r", "2", "--model.vision.trainable"])
    assert stage.model_changes == {"language": {"lora_r": 2}, "vision": {"trainable": True}}
    model = stage.build_model()
    assert model.config.language.lora_r == 2 and model.config.vision.trainable
    assert model.llm.peft_config["default"].r == 2
    assert all(p.requires_grad for p in model.vision.parameters())
    # align takes the same options; the instruct section's model fields are not align's
    align = _stage_from_cli(monkeypatch, ["train", "align", "--config", str(config), "--train-data",
                                          str(data["align"]), "--model.projector.pool", "2"])
    assert align.model_config.projector.pool == 2 and align.model_config.language.lora_r == 0


def test_unknown_or_invalid_model_fields_are_clear_errors(data, tiny_llm_dir, tmp_path, capsys):
    config = write_config(tmp_path, tiny_llm_dir, steps=2)
    base = ["train", "instruct", "--config", str(config), "--train-data", str(data["instruct"]), "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main(base + ["--model.language.lora-rank", "8"])
    assert exited.value.code == 2 and "unrecognized arguments: --model.language.lora-rank" in capsys.readouterr().err
    assert main(base + ["--model.language.quantization", "3bit"]) == 2
    assert "quantization must be none, 8bit or 4bit" in capsys.readouterr().err
    from train.cli import build_stage, load_config_file

    with pytest.raises(ConfigError, match=r"instruct.model|model.language: unknown field\(s\) lora_rank"):
        build_stage("instruct", load_config_file(str(config)), {}, {}, {"language": {"lora_rank": 8}})
    with pytest.raises(ConfigError, match="not a MedVLM"):
        build_stage("clip", load_config_file(str(config)), {}, {}, {"language": {"lora_r": 8}})
    stage, _ = build_stage("instruct", load_config_file(str(config)), {}, {"init": str(tmp_path / "ckpt")},
                           {"projector": {"pool": 2}})
    with pytest.raises(ConfigError, match="the checkpoint's model keeps its projector"):
        stage.build_model()
