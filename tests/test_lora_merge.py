"""Inference loads merge the LoRA adapter into the LLM's weights; training loads keep it separate.

The merged model must answer as the separate one does (same greedy tokens, logits within float
rounding); speed is measured by `medvlm bench lora-merge`, never asserted here.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.conftest import SHARED_DATA
from vlm.errors import CheckpointError
from vlm.generation import ConversationCache, GenerationConfig, TextStream, generate_ids
from vlm.medvlm_assistant import MedVLMAssistant
from vlm.model import MedVLM, lora_merge_applies


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 48, generator=g) * 255).to(torch.uint8).numpy())


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>\n{text}"}]


def _lora_layers(model) -> int:
    return sum(hasattr(m, "lora_A") for m in model.llm.modules())


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_config, tmp_path_factory):
    """A tiny checkpoint whose adapter changes the logits (B matrices moved off zero)."""
    torch.manual_seed(3)
    model = MedVLM.build(tiny_config.replace(language={"lora_r": 4}))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.save_pretrained(tmp_path_factory.mktemp("lora") / "ckpt")


def test_a_merged_inference_load_answers_as_the_separate_adapter(lora_checkpoint):
    separate = MedVLM.from_pretrained(str(lora_checkpoint))
    merged = MedVLM.from_pretrained(str(lora_checkpoint), merge_lora=True)
    assert not separate.lora_merged and _lora_layers(separate) > 0
    assert merged.lora_merged and _lora_layers(merged) == 0 and not hasattr(merged.llm, "peft_config")
    assert merged.config.language.lora_r == 4  # the config still says what was merged
    batch = separate.processor.generation_batch([_ask("Is the heart enlarged?"), _ask("Modality?")],
                                                [[_image(1)], [_image(2)]])
    with torch.no_grad():
        want = separate(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        got = merged(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        with separate.llm.disable_adapter():
            no_adapter = separate(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    assert not torch.allclose(want, no_adapter, atol=1e-3), "the adapter must matter, else the test proves nothing"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for gen in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12).guarded()):
        assert generate_ids(merged, batch, gen) == generate_ids(separate, batch, gen)


def test_a_training_load_keeps_the_adapter_separate_and_trainable(lora_checkpoint):
    model = MedVLM.from_pretrained(str(lora_checkpoint), lora_trainable=True, merge_lora=True)
    assert not model.lora_merged and hasattr(model.llm, "peft_config")
    lora = [p for name, p in model.llm.named_parameters() if "lora_" in name]
    assert lora and all(p.requires_grad for p in lora)
    assert not lora_merge_applies(model.config, lora_trainable=True)
    # Merging into 8/4-bit weights would re-quantize them: quantized loads keep the adapter separate.
    assert not lora_merge_applies(model.config.replace(language={"quantization": "4bit"}), lora_trainable=False)


def test_a_merged_model_cannot_be_saved_or_given_adapter_weights(lora_checkpoint, tmp_path):
    merged = MedVLM.from_pretrained(str(lora_checkpoint), merge_lora=True)
    with pytest.raises(CheckpointError, match="merged.*merge_lora=False"):
        merged.save_pretrained(tmp_path / "out")
    with pytest.raises(CheckpointError, match="merged"):
        merged.load_trained_parts(lora_checkpoint)
    assert not (tmp_path / "out").exists()


def test_info_reports_the_rank_of_the_merged_adapter(lora_checkpoint, capsys):
    from vlm.cli import main

    assert main(["info", "--model", str(lora_checkpoint), "--device", "cpu"]) == 0
    assert "LoRA rank 4 (merged into the LLM's weights for inference)" in capsys.readouterr().out


def test_the_assistant_loads_merged_and_its_conversation_cache_still_works(lora_checkpoint):
    assistant = MedVLMAssistant.from_reference(str(lora_checkpoint))
    described = assistant.describe()
    assert described["lora_merged"] is True and described["lora_rank"] == 4
    separate = MedVLM.from_pretrained(str(lora_checkpoint))
    image, gen = _image(4), GenerationConfig(max_new_tokens=6)
    first = [{"role": "user", "content": "What imaging modality is this?"}]
    assert assistant.generate([first], [[image]], gen) == separate.generate(
        [separate.processor.with_markers(first, 1)], [[image]], max_new_tokens=6)
    session = ConversationCache()
    reply = "".join(assistant.stream(first, [image], gen, session=session))
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Is it normal?"}]
    cached = "".join(assistant.stream(follow, [image], gen, session=session))
    assert session.last_reused > 0
    fresh = "".join(TextStream(separate, separate.processor.with_markers(follow, 1), [image], gen))
    assert cached == fresh


def test_bench_lora_merge_runs_end_to_end(lora_checkpoint, tmp_path, capsys):
    from vlm.cli import main

    vqa_rad = SHARED_DATA / "vqa_rad"
    if not vqa_rad.is_dir():
        pytest.skip(f"real data not present at {vqa_rad}")
    image = sorted((vqa_rad / "images").glob("*.jpg"))[0]
    out = tmp_path / "lora-merge.json"
    rc = main(["bench", "lora-merge", "--model", str(lora_checkpoint), "--device", "cpu", "--image", str(image),
               "--data", str(vqa_rad), "--questions", "2", "--batch-size", "2", "--new-tokens", "4",
               "--repeats", "2", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["variants"]["separate"]["peft_lora_layers"] > 0 and results["variants"]["merged"]["lora_merged"]
    assert results["variants"]["merged"]["peft_lora_layers"] == 0
    assert [len(results["runs"][v]) for v in ("separate", "merged")] == [2, 2]
    assert all(len(run["ids"]) == 4 for runs in results["runs"].values() for run in runs)  # a fixed decode length
    assert results["same_decode_tokens"] == results["same_chat_reply"] == results["runs_total"] == 4
    assert results["same_eval_answers"] == 2 and results["max_abs_logit_diff"] < 1e-3
    table = capsys.readouterr().out
    assert "| median | adapter separate | merged | merged vs separate |" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()
