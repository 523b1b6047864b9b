"""The model contract: placeholders, labels, generation paths, checkpoints, quantization, LoRA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from vlm.checkpoint import stored_parts
from vlm.errors import CheckpointError, InputError
from vlm.generation import GenerationConfig, generate_ids
from vlm.model import MedVLM
from vlm.processor import IGNORE_INDEX


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 48, generator=g) * 255).to(torch.uint8).numpy())


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": f"<image>\n{text}"}]


def test_placeholder_count_mismatch_raises_clear_error(tiny_model):
    encoded = tiny_model.processor.encode(_ask("Is the heart enlarged?"), add_generation_prompt=True)
    ids = torch.tensor([encoded.input_ids])
    two_images = tiny_model.preprocess([_image(0), _image(1)])
    with pytest.raises(InputError, match="placeholder mismatch.*1 image markers.*2 images"):
        tiny_model(ids, pixel_values=two_images)
    with pytest.raises(InputError, match="placeholder mismatch"):
        tiny_model(ids, pixel_values=None)
    # Generation checks markers against images before running the model.
    with pytest.raises(InputError, match="1 <image> markers but 0 images"):
        tiny_model.generate([_ask("Is the heart enlarged?")], [[]], max_new_tokens=2)


def test_placeholders_expand_to_image_token_count(tiny_model):
    messages = [{"role": "user", "content": "<image>\nCompare <image> with the prior."}]
    encoded = tiny_model.processor.encode(messages, add_generation_prompt=True)
    assert encoded.input_ids.count(tiny_model.image_token_id) == 2 * tiny_model.num_image_tokens
    assert encoded.num_images == 2


def test_labels_are_ignored_exactly_on_non_assistant_positions(tiny_model):
    tok = tiny_model.tokenizer
    messages = [
        {"role": "user", "content": "<image>\nIs the heart enlarged?"},
        {"role": "assistant", "content": "Yes, there is cardiomegaly."},
        {"role": "user", "content": "Is there a pleural effusion?"},
        {"role": "assistant", "content": "No."},
    ]
    encoded = tiny_model.processor.encode(messages)
    ids, labels = torch.tensor(encoded.input_ids), torch.tensor(encoded.labels)
    learned = labels != IGNORE_INDEX
    assert torch.equal(labels[learned], ids[learned])
    assert not learned[ids == tiny_model.image_token_id].any()
    # Learned positions are the two replies with their end-of-turn tokens, and nothing else.
    assert tok.decode(ids[learned]) == "Yes, there is cardiomegaly.<|im_end|>\nNo.<|im_end|>\n"
    # Everything else (system prompt, user turns, role headers) is ignored.
    rendered_without_replies = tok.decode(ids[~learned])
    assert "You are a careful radiology assistant" in rendered_without_replies
    assert "Is there a pleural effusion?" in rendered_without_replies
    assert "cardiomegaly" not in rendered_without_replies


def test_greedy_generation_with_cache_equals_without(tiny_model):
    batch = tiny_model.processor.generation_batch([_ask("What imaging modality is this?")], [[_image(3)]])
    with_cache = generate_ids(tiny_model, batch, GenerationConfig(max_new_tokens=12, use_cache=True))
    without = generate_ids(tiny_model, batch, GenerationConfig(max_new_tokens=12, use_cache=False))
    assert len(with_cache[0]) > 0
    assert with_cache == without


def test_mixed_length_batch_equals_one_by_one(tiny_model):
    questions = ["Is there a pleural effusion in the left hemithorax?", "Modality?",
                 "Which organ is shown in this image and is the heart enlarged or normal?"]
    messages = [_ask(q) for q in questions]
    images = [[_image(i)] for i in range(len(questions))]
    gen = GenerationConfig(max_new_tokens=10)
    batched = generate_ids(tiny_model, tiny_model.processor.generation_batch(messages, images), gen)
    lengths = {len(tiny_model.processor.encode(m, add_generation_prompt=True).input_ids) for m in messages}
    assert len(lengths) == 3, "prompts must differ in length for this test to mean anything"
    single = [generate_ids(tiny_model, tiny_model.processor.generation_batch([m], [i]), gen)[0] for m, i in zip(messages, images)]
    assert batched == single


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    batch = tiny_model.processor.generation_batch([_ask("Modality?")], [[_image(5)]])
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert generate_ids(tiny_model, batch, gen) == generate_ids(tiny_model, batch, gen)


def test_save_then_load_gives_identical_logits(tiny_config, tmp_path):
    config = tiny_config.replace(language={"lora_r": 4}, projector={"pool": 2, "input_norm": "layernorm"})
    torch.manual_seed(1)
    model = MedVLM.build(config)
    # Move the LoRA B matrices off zero so the adapter actually changes the logits; same for the norm's gain.
    with torch.no_grad():
        model.projector.norm.weight.uniform_(0.5, 1.5)
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = model.processor.generation_batch([_ask("Is the heart enlarged?")], [[_image(9)]])
    folder = model.save_pretrained(tmp_path / "ckpt")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "projector.safetensors", "vision.safetensors", "adapter", "MODEL_CARD.md"}
    loaded = MedVLM.from_pretrained(str(folder))
    with torch.no_grad():
        before = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        after = loaded(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
        base = MedVLM.build(config.replace(language={"lora_r": 0}))
        base.projector.load_state_dict(model.projector.state_dict())
        base.vision.load_state_dict(model.vision.state_dict())
        no_adapter = base(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, no_adapter), "the adapter must matter, else the test proves nothing"


def test_projector_input_norm_makes_image_tokens_independent_of_feature_scale(tiny_config):
    from vlm.projector import Projector

    features = torch.randn(2, 16, 32)
    for input_norm, scale_matters in (("none", True), ("layernorm", False)):
        torch.manual_seed(0)
        projector = Projector(dataclasses.replace(tiny_config.projector, input_norm=input_norm), 32, 64, (4, 4), has_cls=False)
        with torch.no_grad():
            small, large = projector(features), projector(30 * features)
        assert (not torch.allclose(small, large, atol=1e-4)) == scale_matters, input_norm


def test_damaged_checkpoint_fails_clearly(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "ckpt")
    (folder / "projector.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="damaged"):
        MedVLM.from_pretrained(str(folder))
    (folder / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        MedVLM.from_pretrained(str(folder))
    with pytest.raises(CheckpointError, match="no config.json"):
        MedVLM.from_pretrained(str(tmp_path))


def test_checkpoint_stores_the_parts_its_config_names(tiny_model, tmp_path):
    frozen_hub_tower = dataclasses.replace(tiny_model.config.vision, arch=None, source="hf-hub:org/tower")
    assert stored_parts(dataclasses.replace(tiny_model.config, vision=frozen_hub_tower)) == ("projector",)
    assert set(tiny_model.trainable_state()) == set(stored_parts(tiny_model.config)) == {"projector", "vision"}
    folder = tiny_model.save_pretrained(tmp_path / "ckpt")
    assert (folder / "MODEL_CARD.md").read_text().startswith("# ckpt\n")  # the folder's name, not the temporary one's
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left
    (folder / "vision.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vision.safetensors is missing"):
        MedVLM.from_pretrained(str(folder))


def test_4bit_nf4_llm_loads_and_generates_on_cpu(tiny_config):
    import bitsandbytes as bnb

    model = MedVLM.build(tiny_config.replace(language={"quantization": "4bit"}))
    linear4 = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.weight.quant_type == "nf4" for m in linear4)
    replies = model.generate([_ask("Modality?")], [[_image(2)]], max_new_tokens=6)
    assert len(replies) == 1 and isinstance(replies[0], str)
    ids = generate_ids(model, model.processor.generation_batch([_ask("Modality?")], [[_image(2)]]), GenerationConfig(max_new_tokens=6))
    assert len(ids[0]) > 0


def test_lora_step_after_generate_has_gradients_in_4bit(tiny_config):
    """DESIGN's AVX512-BF16 trap: a no-grad forward must not make 4-bit LoRA untrainable."""
    import bitsandbytes as bnb

    model = MedVLM.build(tiny_config.replace(language={"quantization": "4bit", "lora_r": 4}))
    # This machine may lack AVX512-BF16 (then the trap cannot fire here), so check the guard itself.
    linear4 = [m for m in model.llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4 and all(m.support_avx512bf16_for_cpu is False for m in linear4)
    model.generate([_ask("Modality?")], [[_image(4)]], max_new_tokens=3)
    model.train()
    messages = _ask("Is the heart enlarged?") + [{"role": "assistant", "content": "Yes."}]
    encoded = model.processor.encode(messages)
    out = model(torch.tensor([encoded.input_ids]), pixel_values=model.preprocess([_image(4)]),
                labels=torch.tensor([encoded.labels]))
    out.loss.backward()
    lora = [(n, p) for n, p in model.llm.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for _, p in lora)
    missing = [n for n, p in lora if p.grad is None]
    assert not missing, f"LoRA parameters without gradient: {missing[:3]}"
    assert any(p.grad.abs().sum() > 0 for n, p in lora if "lora_B" in n)


def test_follow_up_turn_reuses_the_conversation_cache(tiny_model):
    """A follow-up turn with the cache computes only new tokens and answers exactly as without it."""
    from vlm.generation import ConversationCache, TextStream, images_digest

    image = _image(11)
    first = _ask("What imaging modality is this?")
    session = ConversationCache()
    gen = GenerationConfig(max_new_tokens=6)
    reply = "".join(TextStream(tiny_model, first, [image], gen, session=session))
    follow = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Is the heart enlarged?"}]
    ids = tiny_model.processor.encode(follow, add_generation_prompt=True).input_ids
    key = images_digest(tiny_model.preprocess([image]))
    reused = session.reusable_length(ids, tiny_model.image_token_id, key)
    image_end = max(i for i, t in enumerate(ids) if t == tiny_model.image_token_id)
    assert reused > image_end, "the image and the first turn come from the cache"
    calls = []
    hook = tiny_model.vision.register_forward_hook(lambda *args: calls.append(1))
    with_cache = "".join(TextStream(tiny_model, follow, [image], gen, session=session))
    hook.remove()
    assert calls == [], "the image is not encoded again"
    assert with_cache == "".join(TextStream(tiny_model, follow, [image], gen))
    # The same words about another image share every token id but must not reuse the cache.
    other_key = images_digest(tiny_model.preprocess([_image(12)]))
    assert session.reusable_length(ids, tiny_model.image_token_id, key) > image_end
    assert session.reusable_length(ids, tiny_model.image_token_id, other_key) == 0
    fresh = "".join(TextStream(tiny_model, follow, [_image(12)], gen))
    assert "".join(TextStream(tiny_model, follow, [_image(12)], gen, session=session)) == fresh


def test_loss_over_kept_logits_equals_the_llms_full_logits_loss(tiny_model):
    """forward() computes vocabulary logits only where a supervised token is predicted; the loss
    must be the LLM's own (all positions) mean cross-entropy, padding and masked prompts included."""
    rows = [tiny_model.processor.encode(_ask(q) + [{"role": "assistant", "content": a}])
            for q, a in (("Is the heart enlarged?", "Yes."), ("Which plane?", "Axial, at the level of the liver."))]
    width = max(len(r.input_ids) for r in rows)
    pad = tiny_model.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in rows])
    labels = torch.tensor([[-100] * (width - len(r.labels)) + r.labels for r in rows])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - len(r.input_ids)] for r in rows])).long()
    pixels = tiny_model.preprocess([_image(1), _image(2)])
    with torch.no_grad():
        ours = tiny_model(ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        full = tiny_model.llm(inputs_embeds=tiny_model.embed(ids, pixels), attention_mask=mask, labels=labels).loss
    assert labels.ne(-100).sum() < labels.numel() / 2  # the test means something: most positions unsupervised
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)


def test_train_mode_leaves_a_frozen_vision_tower_in_eval_mode(tiny_model):
    """Batch norm in a frozen CNN trunk must keep its running statistics while the LLM trains."""
    tiny_model.train()
    assert tiny_model.llm.training and tiny_model.projector.training
    assert not any(m.training for m in tiny_model.vision.modules())
    tiny_model.config = tiny_model.config.replace(vision={"trainable": True})
    tiny_model.train()
    assert tiny_model.vision.training


def test_a_trained_cnn_tower_keeps_its_batch_norm_statistics(tiny_config):
    """instruct --train-vision: the trunk's weights learn, its batch norm keeps the running statistics."""
    import torch.nn as nn

    cnn = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "linear", "image_size": 64}}
    config = dataclasses.replace(tiny_config, vision=dataclasses.replace(
        tiny_config.vision, arch=cnn, trainable=True, feature_layer=-1)).validate()
    model = MedVLM.build(config).train()
    norms = [m for m in model.vision.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert any(m.training for m in model.vision.modules() if isinstance(m, nn.Conv2d))
    before = [m.running_mean.clone() for m in norms]
    model.image_features(torch.rand(2, 3, 64, 64))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
