"""LoRA/QLoRA instruction tuning of transformers image-text-to-text models (train/hf_instruct.py,
train/hf_labels.py, vlm/hf_lora.py), on tiny random-weight models built offline (tests/hf_fixtures.py).

Labels are checked against a mask written out by hand from each family's template structure. The
training tests use copies of the tiny models whose output layer is scaled up (`confident_copy`): at
random initialization its logits are bounded near zero (|logit| < ~1.3 over a 600-token vocabulary), so
no adapter could make any prediction confident and a loss could barely fall; a pretrained head is not
like that."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eval.run import evaluate
from eval.tasks import load_task
from tests.hf_fixtures import tiny_vlm_folder
from tests.serve_fixtures import free_port
from tests.train_fixtures import write_conversations
from train import state as saved
from train.cli import build_hf_stage, load_config_file
from train.data import ConversationRecord
from train.hf_instruct import HFInstructConfig, HFInstructStage
from train.loop import TrainConfig, train
from vlm.backends import load_assistant
from vlm.cli import main
from vlm.errors import CheckpointError
from vlm.fileio import folder_digest
from vlm.generation import GenerationConfig
from vlm.sources import model_kind

TRAINED_FAMILIES = ("llava", "gemma3", "qwen2_5_vl")
CONVERSATION = ({"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A CT scan."},
                {"role": "user", "content": "Normal?"}, {"role": "assistant", "content": "yes"})


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are 64 wide: a second thread buys nothing, and on a shared 2-core machine a busy
    neighbour makes OpenMP's two threads wait on each other (a 60x slowdown was seen)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def confident_copy(family: str, factory) -> Path:
    """The tiny `family` model with its output layer scaled by 10 (see the module docstring)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = factory.getbasetemp() / "confident" / family
    if not folder.is_dir():
        source = tiny_vlm_folder(family, factory)
        model = AutoModelForImageTextToText.from_pretrained(source)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10)
        model.save_pretrained(folder)
        AutoProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """8 memorizable two-turn conversations, each about its own image (tests/train_fixtures.py)."""
    return write_conversations(tmp_path_factory.mktemp("conversations"))


def _stage(base: Path, data: Path | str = "", **fields) -> HFInstructStage:
    return HFInstructStage(HFInstructConfig(model=str(base), train_data=str(data), **fields), 8, False, "cpu")


def _image(seed: int = 0, size: int = 112) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


# ---- labels -----------------------------------------------------------------------------------------------

def _expected_pieces(family: str) -> list[tuple[str, bool]]:
    """CONVERSATION with one 112x112 image as each family's template and processor write it, by hand:
    (text, learned). Learned is each reply and its end-of-turn token, nothing after it; llava-1.5's
    template ends a reply with a space and no end token, so the tokenizer's </s> follows each reply."""
    if family == "llava":  # 16 image tokens: 4x4 CLIP patches of the 56x56 crop, CLS dropped
        return [("<s>USER: " + "<image>" * 16 + "\nWhat is this? ASSISTANT:", False), (" A CT scan. </s>", True),
                ("USER: Normal? ASSISTANT:", False), (" yes </s>", True)]
    if family == "gemma3":  # the template's <bos>; 16 pooled SigLIP tokens between blank lines
        image = "\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n"
        return [("<bos><start_of_turn>user\n" + image + "What is this?<end_of_turn>\n<start_of_turn>model\n", False),
                ("A CT scan.<end_of_turn>", True),
                ("\n<start_of_turn>user\nNormal?<end_of_turn>\n<start_of_turn>model\n", False),
                ("yes<end_of_turn>", True), ("\n", False)]
    if family == "qwen2_5_vl":  # the default system prompt; 8x8 patches of 112x112 merged 2x2: 16 tokens
        image = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>"
        return [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + image
                 + "What is this?<|im_end|>\n<|im_start|>assistant\n", False), ("A CT scan.<|im_end|>", True),
                ("\n<|im_start|>user\nNormal?<|im_end|>\n<|im_start|>assistant\n", False), ("yes<|im_end|>", True),
                ("\n", False)]
    # idefics3 (SmolVLM): one global 56x56 image, 16 tokens after pixel shuffle
    image = "<fake_token_around_image><global-img>" + "<image>" * 16 + "<fake_token_around_image>"
    return [("<|im_start|>User:" + image + "What is this?<end_of_utterance>\nAssistant:", False),
            (" A CT scan.<end_of_utterance>", True), ("\nUser: Normal?<end_of_utterance>\nAssistant:", False),
            (" yes<end_of_utterance>", True), ("\n", False)]


@pytest.mark.parametrize("family", [*TRAINED_FAMILIES, "idefics3"])
def test_labels_are_the_replies_and_their_end_token(family, tmp_path_factory, tmp_path):
    stage = _stage(tiny_vlm_folder(family, tmp_path_factory))
    stage.build_model()
    tokenizer = stage.encoder.tokenizer
    ids, labels = [], []
    for text, learned in _expected_pieces(family):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [-100] * len(piece)
    _image(0).save(tmp_path / "a.png")
    two_turns = ConversationRecord((tmp_path / "a.png",), CONVERSATION, "test", 1)
    one_turn = ConversationRecord((tmp_path / "a.png",), CONVERSATION[:2], "test", 2)
    batch = stage.collate([two_turns, one_turn])
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == labels
    assert batch["attention_mask"][0].all()
    # the shorter conversation is right-padded, and its padding is never learned
    short = int(batch["attention_mask"][1].sum())
    assert short < len(ids) and not batch["attention_mask"][1, short:].any()
    assert (batch["labels"][1, short:] == -100).all()
    expected_inputs = {"gemma3": {"token_type_ids"}, "qwen2_5_vl": {"mm_token_type_ids", "image_grid_thw"},
                       "idefics3": {"pixel_attention_mask"}}.get(family, set())
    assert expected_inputs <= set(batch)


# ---- training -------------------------------------------------------------------------------------------

def _losses(run: Path) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_loss_falls_on_eight_memorizable_samples(family, conversations, tmp_path_factory, tmp_path):
    base = confident_copy(family, tmp_path_factory)
    assert main(["train", "instruct", "--model", str(base), "--train-data", str(conversations), "--out",
                 str(tmp_path / "run"), "--steps", "20", "--batch-size", "8", "--lr", "1e-2", "--precision", "fp32",
                 "--device", "cpu"]) == 0
    losses = _losses(tmp_path / "run")
    first, last = losses[0], sum(losses[-3:]) / 3
    print(f"{family}: loss {first:.3f} -> {last:.3f}")
    assert len(losses) == 20 and last < 0.25 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"


class _Stop(Exception):
    """Raised right after a checkpoint is complete: the run stops there, as if killed."""


def test_six_straight_steps_equal_three_then_resume_then_three(conversations, tmp_path_factory, tmp_path, monkeypatch):
    base = confident_copy("qwen2_5_vl", tmp_path_factory)
    cfg = dict(steps=6, batch_size=4, lr=1e-2, precision="fp32", save_every=3, device="cpu")
    train(_stage(base, conversations), TrainConfig(out=str(tmp_path / "straight"), **cfg))
    write = saved.write

    def write_then_stop(out, step, *args):
        folder = write(out, step, *args)
        if step == 3:
            raise _Stop
        return folder

    monkeypatch.setattr(saved, "write", write_then_stop)
    with pytest.raises(_Stop):
        train(_stage(base, conversations), TrainConfig(out=str(tmp_path / "resumed"), **cfg))
    monkeypatch.setattr(saved, "write", write)
    assert saved.latest(tmp_path / "resumed").name == "step-00000003"
    assert not (tmp_path / "resumed" / "final").exists()
    train(_stage(base, conversations), TrainConfig(out=str(tmp_path / "resumed"), **cfg))  # resumes at step 3
    a, b = (load_file(str(tmp_path / run / "final" / "adapter_model.safetensors")) for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def _qlora_gradients(base: Path, data: Path, generate_first: bool) -> dict[str, torch.Tensor | None]:
    """The LoRA gradients of one QLoRA step on two samples, after a no-grad generate or not."""
    import bitsandbytes as bnb

    stage = _stage(base, data, quantization="4bit", dtype="bfloat16")
    torch.manual_seed(0)  # the same fresh adapter both times
    model = stage.build_model()
    parts = model.get_base_model().model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in parts.language_model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in parts.vision_tower.modules())  # the LM alone is 4-bit
    batch = stage.collate(stage.datasets()[0][:2])
    if generate_first:
        model.eval()
        with torch.no_grad():
            model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=3, do_sample=False)
    model.train()
    stage.step(model, batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if "lora_" in name}


def test_a_qlora_step_after_generate_has_lora_gradients(conversations, tmp_path_factory):
    """4-bit NF4 language model with bf16 compute. On CPUs with AVX512-BF16 a no-grad forward (generate)
    makes bitsandbytes repack its 4-bit weights unless told not to, and the backward through repacked
    weights is wrong (None, or with bitsandbytes 0.50 silently different gradients). So after generate
    every LoRA weight gets a gradient, the same as in a step that never generated."""
    base = confident_copy("gemma3", tmp_path_factory)
    after, fresh = (_qlora_gradients(base, conversations, generate_first) for generate_first in (True, False))
    missing = [name for name, grad in after.items() if grad is None]
    assert after and not missing, f"no gradient for {missing[:3]}"
    # B starts at zero, so at this first step A's gradients are zero and B's are not
    assert any(float(grad.abs().sum()) > 0 for name, grad in after.items() if "lora_B" in name)
    assert after.keys() == fresh.keys()
    for name in after:
        assert torch.equal(after[name], fresh[name]), name


# ---- the run folder ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(conversations, tmp_path_factory):
    """A short gemma3 run with LoRA on the vision tower and the projector trained in full, so the
    run folder also carries peft modules_to_save; the stage (and its model) kept for comparison."""
    base = confident_copy("gemma3", tmp_path_factory)
    stage = _stage(base, conversations, vision="lora", projector="full")
    out = tmp_path_factory.mktemp("trained") / "run"
    final = train(stage, TrainConfig(out=str(out), steps=6, batch_size=8, lr=1e-2, precision="fp32", device="cpu"))
    stage.model.eval()
    return {"base": base, "final": final, "stage": stage, "records": stage.datasets()[0]}


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_the_run_folder_is_peft_format_and_loads_through_plain_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    final = trained["final"]
    config = json.loads((final / "config.json").read_text())
    assert config["medvlm_kind"] == "transformers-lora" and "model_type" not in config
    assert config["base_model"] == str(trained["base"]) and config["base_revision"] == folder_digest(trained["base"])
    assert config["lora"]["vision"] == "lora" and config["lora"]["projector"] == "full"
    assert {p.name for p in final.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "config.json",
                                                  "MODEL_CARD.md"}
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert any(".vision_tower." in k and "lora_A" in k for k in weights)
    assert any(".multi_modal_projector." in k and "lora" not in k for k in weights)  # trained in full
    batch = trained["stage"].collate(trained["records"][:3])
    expected = _logits(trained["stage"].model, batch)
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(trained["base"]), str(final)).eval()
    assert torch.equal(_logits(plain, batch), expected)


def _greedy(model, processor, image: Image.Image, question: str, tokens: int = 8) -> str:
    """Plain transformers: the processor's own chat template and model.generate, greedy."""
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_the_merged_export_loads_with_from_pretrained_and_answers_the_same(trained, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = tmp_path / "merged"
    assert main(["export", "--merge", str(trained["final"]), str(out)]) == 0
    assert not (out / "adapter_config.json").exists() and "model_type" in json.loads((out / "config.json").read_text())
    merged, processor = AutoModelForImageTextToText.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    image = Image.open(trained["records"][0].images[0]).convert("RGB")
    adapter = trained["stage"].model
    for question in ("What does this show?", "Is it normal?"):
        answer = _greedy(merged, processor, image, question)
        assert answer and answer == _greedy(adapter, processor, image, question)
    assert model_kind(str(out)) == "transformers"


def test_model_run_final_works_in_chat_and_eval(trained, tmp_path, capsys):
    final = str(trained["final"])
    assert model_kind(final) == "transformers"
    assistant = load_assistant(final)
    image_path = trained["records"][0].images[0]
    image = Image.open(image_path).convert("RGB")
    gen = GenerationConfig(max_new_tokens=8).guarded()
    expected = assistant.generate([[{"role": "user", "content": "What does this show?"}]], [[image]], gen)[0]
    assert main(["chat", "What does this show?", "--image", str(image_path), "--model", final,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected and expected
    records = [json.dumps({"id": f"q{k}", "image": str(r.images[0]), "question": "What does this show?",
                         "answer": "yes", "answer_type": "closed"}) for k, r in enumerate(trained["records"][:3])]
    (tmp_path / "vqa.jsonl").write_text("\n".join(records) + "\n")
    task = load_task("vqa-jsonl", tmp_path / "vqa.jsonl")
    results = evaluate(assistant, task, tmp_path / "eval", batch_size=2, max_new_tokens=8, bootstrap=0,
                       model_ref=final, progress=False)
    info = results["model_info"]
    assert info["revision"] == folder_digest(final)  # the adapter's digest
    assert info["base_model"] == str(trained["base"]) and info["base_revision"] == folder_digest(trained["base"])
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    predicted = [json.loads(line)["prediction"] for line in lines]
    plain = trained["stage"].model
    processor = trained["stage"].encoder.processor
    assert predicted == [_greedy(plain, processor, Image.open(r.images[0]).convert("RGB"),
                                 "What does this show?\nAnswer briefly.") for r in trained["records"][:3]]


def test_a_run_whose_base_changed_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["final"], run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "base_revision": "sha256:" + "0" * 64}))
    with pytest.raises(CheckpointError, match="restore the base it was trained on"):
        load_assistant(str(run))


# ---- recipes and options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe, base, quantization, r", [
    ("medgemma-4b-qlora", "hf:google/medgemma-4b-it", "4bit", 16),
    ("qwen2.5-vl-7b-qlora", "hf:Qwen/Qwen2.5-VL-7B-Instruct", "4bit", 64)])
def test_the_presets_are_qlora_recipes_for_their_base(recipe, base, quantization, r):
    stage, cfg = build_hf_stage(load_config_file(recipe), {}, {"train_data": "conv.json"})
    assert (stage.cfg.model, stage.cfg.quantization, stage.lora.r, cfg.precision) == (base, quantization, r, "bf16")
    stage, _ = build_hf_stage(load_config_file(recipe), {}, {"model": "/somewhere/else"})
    assert stage.cfg.model == "/somewhere/else" and stage.lora.r == r  # --model overrides the recipe's base


def test_options_of_the_other_model_kind_are_refused(conversations, tmp_path_factory, capsys):
    base = str(tiny_vlm_folder("gemma3", tmp_path_factory))
    args = ["train", "instruct", "--train-data", str(conversations), "--out", "/nonexistent/run"]
    assert main([*args, "--model", base, "--init", "demo"]) == 2
    assert "options of medvlm models" in capsys.readouterr().err
    assert main([*args, "--config", "tiny", "--lora-r", "8"]) == 2
    assert "--lora-r: options of a transformers --model" in capsys.readouterr().err
    assert main([*args, "--model", "demo"]) == 2
    assert "not a transformers model" in capsys.readouterr().err


def test_qlora_runs_data_parallel_under_torchrun_with_the_same_command(conversations, tmp_path_factory, tmp_path):
    """Two CPU processes (gloo), each a 4-bit replica of the base, one global batch split between them."""
    import os
    import subprocess
    import sys

    base = tiny_vlm_folder("gemma3", tmp_path_factory)
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "vlm.cli", "train", "instruct",
         "--model", str(base), "--quantization", "4bit", "--train-data", str(conversations), "--out", str(out),
         "--steps", "2", "--batch-size", "2", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_losses(out)) == 2  # one row per step, written by rank 0 only
    assert json.loads((out / "final" / "config.json").read_text())["quantization"] == "4bit"
