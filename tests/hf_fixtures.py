"""Tiny random-weight Hugging Face image-text-to-text models, built offline, for four real families.

Each folder holds what a hub checkpoint holds (config, safetensors weights, tokenizer, image
processor, the family's real chat template, generation config), so code written for
llava-hf/LLaVA-Med, MedGemma, Lingshu/HuatuoGPT-Vision (Qwen2.5-VL) or SmolVLM can be run on CPU
in seconds through the plain `AutoProcessor` / `AutoModelForImageTextToText` entry points.

One calling convention works for all four families (checked by tests/test_hf_fixtures.py):

    proc.tokenizer.padding_side = "left"
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=[text1, text2], images=[[img1], [img2]], return_tensors="pt", padding=True)
    model.generate(**inputs, max_new_tokens=6, do_sample=False)

that is, images nested one list per prompt. A flat list (`images=[img1, img2]`) gives the same
inputs for llava, qwen2_5_vl and idefics3, but Gemma3Processor reads it as two images for the first
prompt and raises ValueError.

Image tokens per image: llava 16 (4x4 CLIP patches of a 56x56 crop, CLS dropped); gemma3 16 (8x8
SigLIP patches of 112x112 pooled 2x2, between <start_of_image> and <end_of_image>, blank lines around);
qwen2_5_vl 4 to 16 by the image's size and aspect ratio (dynamic resolution between 56x56 and
112x112 pixels, 2x2 patch merging: 6 for 40x50, 15 for 512x300, 16 for 512x512); idefics3 16 (one global 56x56
image, splitting off, pixel shuffle 2, wrapped in <fake_token_around_image><global-img>).

Quirks the real checkpoints share (the BOS count is pinned by the tests):
- gemma3: the template writes <bos> and the tokenizer adds one too, so text rendered with
  tokenize=False and then passed to the processor starts with two; pass add_special_tokens=False
  (processor.apply_chat_template(tokenize=True) does that itself). Keep the processor's
  token_type_ids: they give image tokens bidirectional attention, in training and in prefill;
  without them transformers silently falls back to a causal mask.
- qwen2_5_vl: keep mm_token_type_ids and image_grid_thw; without mm_token_type_ids transformers
  silently uses 1D positions instead of the 3D M-RoPE ones. Positions come from the attention mask,
  so left padding does not change the greedy output.

Tokenizers are byte-level BPE trained here on a small radiology corpus (so any text encodes), with
each family's special tokens; chat templates are the ones the real checkpoints ship (sources beside
each template).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

FAMILIES = ("llava", "gemma3", "qwen2_5_vl", "idefics3")

CORPUS = [
    "What imaging modality is this? This is a CT scan of the head. MRI, x-ray, ultrasound, PET.",
    "Is there a pleural effusion? No, there is no pleural effusion. Yes, a small left effusion.",
    "Is the heart enlarged? Yes, there is cardiomegaly. The aorta is tortuous.",
    "The lungs are clear. No pneumothorax. The cardiomediastinal silhouette is normal.",
    "Which organ is shown? The chest, the brain, the liver, the kidney, the abdomen, the spine.",
    "Findings: consolidation in the right lower lobe, atelectasis, nodule, mass, fracture, edema.",
    "Impression: no acute cardiopulmonary process. Describe the image. Answer briefly.",
    "USER: ASSISTANT: User: Assistant: user model system assistant. You are a helpful assistant.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:?!'\"()[]{}<>/-_+=*%$#@&\n",
] * 10

# llava-hf/llava-1.5-7b-hf chat_template.json, as quoted by transformers'
# tests/models/llava/test_processor_llava.py (renders "USER: <image>\n... ASSISTANT:").
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Gemma 3 instruction-tuned (and MedGemma) template: transformers'
# src/transformers/models/gemma3/convert_gemma3_weights.py, _CHAT_TEMPLATE.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct chat_template.json (the same text).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (an Idefics3 checkpoint) chat_template.json; renders
# "<|im_start|>User:<image>...<end_of_utterance>\nAssistant:".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _tokenizer(specials: list[str], named: dict[str, str], extra: dict[str, str], add_bos: bool = False):
    """A byte-level BPE trained on CORPUS (any text encodes), `specials` first in the vocabulary.

    `named` maps the standard roles (bos/eos/pad/unk) to tokens; `extra` names the family's own
    tokens (image_token, boi_token, ...) so processors find them as tokenizer attributes, as with
    the real tokenizers. `add_bos` mirrors Llama and Gemma tokenizers, which prepend their BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, extra_special_tokens=extra,
                                   add_bos_token=add_bos, add_eos_token=False, **named)


def _text_config(tokenizer, **overrides) -> dict:
    """The text tower all four share in size (64 wide, 2 layers, 4 query and 2 key-value heads), with
    the tokenizer's vocabulary and special ids; `overrides` add or replace family-specific fields."""
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id) | overrides


# 64 wide, not 32: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its CPU kernel and that
# needs every quantized Linear's in_features to be a multiple of 64 (the quantization block) and its
# out_features a multiple of 32; a 32-wide layer fails at its first forward ("shape '[32, 0]' is invalid").
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)


def _llava():
    """llava-hf layout: CLIP ViT (CLS dropped, layer -2 features) -> 2-layer GELU MLP -> Llama."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                           dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"),
                           {"image_token": "<image>"}, add_bos=True)
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor = LlavaProcessor(images, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VISION, image_size=56, patch_size=14, projection_dim=64),
        text_config=LlamaConfig(**_text_config(tokenizer)), image_token_index=tokenizer.image_token_id,
        image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id)
    return config, processor, tokenizer.eos_token_id


def _gemma3():
    """MedGemma's layout: SigLIP (no head) -> average pool + RMSNorm + projection -> Gemma 3 text."""
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor, Gemma3TextConfig
    from transformers import SiglipVisionConfig

    markers = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *markers.values()],
                           dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"),
                           markers, add_bos=True)
    images = Gemma3ImageProcessor(size={"height": 112, "width": 112}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(images, tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=16)
    # One sliding-window and one global layer, the window (like MedGemma's 1024) longer than the prompts.
    text = Gemma3TextConfig(**_text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=128,
                                           layer_types=["sliding_attention", "full_attention"]))
    vision = SiglipVisionConfig(**TINY_VISION, image_size=112, patch_size=14, vision_use_head=False)
    config = Gemma3Config(
        text_config=text, vision_config=vision,
        mm_tokens_per_image=16, boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    return config, processor, [tokenizer.eos_token_id, end_of_turn]


def _qwen2_5_vl():
    """Qwen2.5-VL: windowed ViT with 2D rope and 2x2 patch merging -> Qwen2 text with 3D (M-RoPE) positions."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    markers = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *markers],
                           dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                           {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    # 4 to 16 merged tokens per image: at least 56x56 and at most 112x112 pixels after resizing.
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2_5_VLProcessor(Qwen2VLImageProcessor(size=size), tokenizer, Qwen2VLVideoProcessor(size=size),
                                    chat_template=QWEN2_VL_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(
        ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), markers)}
    # M-RoPE splits each head's 8 rotary frequencies between time, height and width.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = _text_config(tokenizer, bos_token_id=None, rope_parameters=rope)
    # Layer 0 attends within 56-pixel (2x2 merged token) windows, layer 1 over the whole image.
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1], window_size=56)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return config, processor, [tokenizer.eos_token_id, tokenizer.pad_token_id]


def _idefics3():
    """SmolVLM-Instruct's layout: SigLIP-style ViT -> pixel shuffle -> linear -> Llama, one global image."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor, Idefics3VisionConfig
    from transformers import LlamaConfig

    grid = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                            "<end_of_utterance>", "<global-img>", *grid],
                           dict(unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                pad_token="<|im_end|>"),
                           {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                            "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"})
    # No splitting: every image becomes one 56x56 global image of 16 tokens.
    images = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 56},
                                    max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(images, tokenizer, image_seq_len=16, chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**TINY_VISION, image_size=56, patch_size=7),
        text_config=LlamaConfig(**_text_config(tokenizer)), scale_factor=2,
        image_token_id=tokenizer.image_token_id, pad_token_id=tokenizer.pad_token_id)
    return config, processor, tokenizer.eos_token_id


BUILDERS = {"llava": _llava, "gemma3": _gemma3, "qwen2_5_vl": _qwen2_5_vl, "idefics3": _idefics3}


def build_tiny_vlm(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of `family` and its processor into `folder` (safetensors weights).

    The same seed gives the same weights. The folder loads with AutoProcessor.from_pretrained and
    AutoModelForImageTextToText.from_pretrained, with or without a BitsAndBytesConfig.
    """
    from transformers import AutoModelForImageTextToText, GenerationConfig

    config, processor, eos = BUILDERS[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id,
                                               bos_token_id=processor.tokenizer.bos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_vlm_folder(family: str, root: Path | pytest.TempPathFactory) -> Path:
    """`root/family`, built on first use and reused after (root: a cache folder, or pytest's
    tmp_path_factory for one folder per test session). The folder's name is the family.

    Building goes to a private folder renamed into place, so concurrent workers never see a half-built model.
    """
    if isinstance(root, pytest.TempPathFactory):
        root = root.getbasetemp() / "tiny-hf-vlms"
    folder = Path(root) / family
    if not folder.is_dir():
        partial = build_tiny_vlm(family, Path(root) / f".{family}-{os.getpid()}")
        try:
            partial.rename(folder)
        except OSError:  # another worker got there first
            shutil.rmtree(partial)
    return folder


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_hf_model(request, tmp_path_factory) -> Path:
    """The folder of one tiny model per family (the test is repeated for each); its name is the family."""
    return tiny_vlm_folder(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} for all four families, built once per session."""
    return {family: tiny_vlm_folder(family, tmp_path_factory) for family in FAMILIES}
