"""The tiny Hugging Face VLMs of tests/hf_fixtures.py behave like the checkpoints they stand for:
they build and load with no network, render the real chat templates, generate the same greedy
tokens for a sample whether it is alone or left-padded in a batch, and load in 4 bits on CPU."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.hf_fixtures import FAMILIES, build_tiny_vlm, tiny_hf_model, tiny_hf_models  # noqa: F401

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there an effusion?"}]}]
CLASSES = {"llava": "LlavaForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration"}
RENDERED = {
    "llava": "USER: <image>\nIs there an effusion? ASSISTANT:",
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>Is there an effusion?<end_of_turn>\n<start_of_turn>model\n",
    "qwen2_5_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "<|vision_start|><|image_pad|><|vision_end|>Is there an effusion?<|im_end|>\n<|im_start|>assistant\n",
    "idefics3": "<|im_start|>User:<image>Is there an effusion?<end_of_utterance>\nAssistant:",
}
# How an assistant turn closes and the next user turn opens.
TURN_CHANGE = {"llava": "ASSISTANT: No. USER: ",
               "gemma3": "<start_of_turn>model\nNo.<end_of_turn>\n<start_of_turn>user\n",
               "qwen2_5_vl": "<|im_start|>assistant\nNo.<|im_end|>\n<|im_start|>user\n",
               "idefics3": "Assistant: No.<end_of_utterance>\nUser: "}
# BOS tokens in processor(text=rendered): Gemma's template and tokenizer both add one, as in MedGemma.
BOS_COUNT = {"llava": 1, "gemma3": 2, "qwen2_5_vl": 0, "idefics3": 1}
# Image tokens for a 40x50 and a 512x300 image; only Qwen2.5-VL's count follows the image's size.
IMAGE_TOKENS = {"llava": [16, 16], "gemma3": [16, 16], "qwen2_5_vl": [6, 15], "idefics3": [16, 16]}


def images():
    """Two RGB images of unlike sizes and contents (the same on every call), so each sample's output
    depends on its own image."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 512, 3), dtype=np.uint8)
    return [Image.new("RGB", (40, 50), (120, 30, 200)), Image.fromarray(noise)]


def load(folder, **kwargs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor, AutoModelForImageTextToText.from_pretrained(folder, **kwargs)


def prompts(processor):
    """The two prompts, rendered by the family's chat template as callers do."""
    longer = {"type": "text", "text": "Which organ is this, and is it enlarged?"}
    second = [{"role": "user", "content": [{"type": "image"}, longer]}]
    return [processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            for chat in (QUESTION, second)]


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_builds_and_loads_offline_with_seeded_weights(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"network use: {a}"))
    folder = build_tiny_vlm(family, tmp_path / "seed0")
    processor, model = load(folder)
    assert type(model).__name__ == CLASSES[family] and not list(folder.glob("*.bin"))
    assert sum(p.numel() for p in model.parameters()) < 500_000 and len(processor.tokenizer) < 1000
    assert processor.tokenizer.image_token_id == model.config.image_token_id
    weights = load_file(folder / "model.safetensors")
    again = load_file(build_tiny_vlm(family, tmp_path / "again") / "model.safetensors")
    other = load_file(build_tiny_vlm(family, tmp_path / "seed1", seed=1) / "model.safetensors")
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert not all(torch.equal(weights[name], other[name]) for name in weights)


def test_session_fixture_holds_every_family(tiny_hf_models):
    assert {family: json.loads((folder / "config.json").read_text())["model_type"]
            for family, folder in tiny_hf_models.items()} == {family: family for family in FAMILIES}


def test_real_chat_template_turn_markers(tiny_hf_model):
    from transformers import AutoProcessor

    family, processor = tiny_hf_model.name, AutoProcessor.from_pretrained(tiny_hf_model)
    assert prompts(processor)[0] == RENDERED[family]
    answer = {"role": "assistant", "content": [{"type": "text", "text": "No."}]}
    follow_up = {"role": "user", "content": [{"type": "text", "text": "And the heart?"}]}
    assert TURN_CHANGE[family] in processor.apply_chat_template([*QUESTION, answer, follow_up], tokenize=False)
    ids = processor(text=prompts(processor)[:1], images=[images()[:1]])["input_ids"][0]
    assert list(ids).count(processor.tokenizer.bos_token_id) == BOS_COUNT[family]


def test_image_tokens_per_image(tiny_hf_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_hf_model)
    counts = [list(processor(text=[text], images=[[image]])["input_ids"][0]).count(processor.tokenizer.image_token_id)
              for text, image in zip(prompts(processor), images())]
    assert counts == IMAGE_TOKENS[tiny_hf_model.name]


def test_flat_image_list(tiny_hf_model):
    """Nested lists work for every family; a flat list too, except for Gemma 3."""
    processor, _ = load(tiny_hf_model)
    nested = processor(text=prompts(processor), images=[[image] for image in images()], padding=True,
                       return_tensors="pt")
    if tiny_hf_model.name == "gemma3":
        with pytest.raises(ValueError, match="number of <start_of_image> tokens"):
            processor(text=prompts(processor), images=images(), padding=True)
    else:
        flat = processor(text=prompts(processor), images=images(), padding=True, return_tensors="pt")
        assert all(torch.equal(flat[key], nested[key]) for key in nested)


def test_left_padded_batch_generates_as_each_sample_alone(tiny_hf_model):
    """Greedy tokens and per-step logits of each left-padded batch row equal that sample's alone
    (Qwen2.5-VL's 3D positions included: they are counted from the attention mask)."""
    processor, model = load(tiny_hf_model)
    batch_inputs = processor(text=prompts(processor), images=[[image] for image in images()],
                             return_tensors="pt", padding=True)
    assert not batch_inputs["attention_mask"][:, 0].all()  # one of the rows is padded
    batch = generate(model, batch_inputs)
    start, pad = batch_inputs["input_ids"].shape[1], processor.tokenizer.pad_token_id
    rows = []
    for row, (text, image) in enumerate(zip(prompts(processor), images())):
        alone_inputs = processor(text=[text], images=[[image]], return_tensors="pt")
        alone = generate(model, alone_inputs)
        tokens = alone.sequences[0, alone_inputs["input_ids"].shape[1]:].tolist()
        batch_tokens = batch.sequences[row, start:].tolist()
        assert batch_tokens[:len(tokens)] == tokens and set(batch_tokens[len(tokens):]) <= {pad}
        for single_step, batch_step in zip(alone.logits, batch.logits):
            torch.testing.assert_close(batch_step[row], single_step[0], atol=1e-4, rtol=1e-4)
        rows.append(tokens)
    assert rows[0] and rows[0] != rows[1]  # the samples are told apart, so a swap would be caught


@pytest.mark.parametrize("kernel", ["native", "generic"])
def test_4bit_loads_and_generates_on_cpu(tiny_hf_model, kernel):
    """nf4 weights with bf16 compute, on both bitsandbytes CPU paths: "native" is this CPU's own (the
    packed AVX512-BF16 kernel where there is one), "generic" the dequantizing matmul other CPUs use."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    processor, model = load(tiny_hf_model, quantization_config=quantization, device_map="cpu")
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.get_decoder().modules())
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu &= kernel == "native"
    inputs = processor(text=prompts(processor), images=[[image] for image in images()],
                       return_tensors="pt", padding=True)
    output = generate(model, inputs)
    new = output.sequences[:, inputs["input_ids"].shape[1]:]
    assert new.shape[1] >= 1 and int(new.max()) < len(processor.tokenizer)
    assert all(torch.isfinite(step).all() for step in output.logits)
