"""Synthetic training data and configs for the training tests (tiny models from conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tests.conftest import TINY_VIT

CAPTIONS = [
    "a chest x-ray showing cardiomegaly.", "a normal chest x-ray.", "a head ct with a bleed.",
    "an abdominal ct.", "a chest x-ray showing an effusion.", "a brain mri.", "a pelvic x-ray.",
    "a chest x-ray showing a nodule.",
]


def make_images(folder: Path, n: int = 8) -> list[Path]:
    """n distinct grayscale images: each a different bright square on a dark background."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.full((48, 48), 20, dtype=np.uint8)
        r, c = divmod(i, 3)
        pixels[r * 16: r * 16 + 16, c * 16: c * 16 + 16] = 230
        path = folder / f"img{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def write_pairs(folder: Path, n: int = 8) -> Path:
    images = make_images(folder / "images", n)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": f"images/{p.name}", "text": CAPTIONS[i % 8]}) + "\n"
                            for i, p in enumerate(images)))
    return path


def write_conversations(folder: Path, n: int = 8) -> Path:
    images = make_images(folder / "images", n)
    records = [{
        "id": str(i), "image": f"images/{p.name}",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat does this show?"},
            {"from": "gpt", "value": CAPTIONS[i % 8]},
            {"from": "human", "value": "Is it normal?"},
            {"from": "gpt", "value": "yes" if "normal" in CAPTIONS[i % 8] else "no"},
        ],
    } for i, p in enumerate(images)]
    path = folder / "conversations.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_config(folder: Path, llm_dir: Path, steps: int = 3, lr: float = 3e-3, **train) -> Path:
    train_section = {"steps": steps, "batch_size": 4, "lr": lr, "warmup_steps": 0, "precision": "fp32", **train}
    data = {
        "model": {"vision": {"source": "", "arch": TINY_VIT}, "projector": {"kind": "mlp2x_gelu"},
                  "language": {"source": str(llm_dir)}, "max_length": 256},
        "align": {"stage": {}, "train": train_section},
        "instruct": {"model": {"language": {"lora_r": 4}}, "stage": {}, "train": train_section},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def pretrain_llm_on_captions(src: Path, dst: Path, steps: int = 80) -> Path:
    """A copy of the tiny LLM trained (text only) on the captions, so that it speaks the data's
    language; a projector can then lower the loss further only by telling it which image it sees."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    texts = [tok.apply_chat_template([{"role": "user", "content": "Describe the image briefly."},
                                      {"role": "assistant", "content": c}], tokenize=False) for c in CAPTIONS]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst
