"""The benchmarks run end to end on tiny offline models; structure and sanity are checked, never speed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval.bench import bench_eval_batching, markdown_eval
from vlm.backends import as_assistant
from eval.bench_model import RANDOM_LLMS, RANDOM_VISIONS, random_llm_config, run_model_bench, synthetic_image
from vlm.cli import main


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _check_variant(v: dict) -> None:
    for key in ("load_s", "image_encoder_images_per_s", "prefill_ms", "time_to_first_token_s", "llm_bytes_read_per_token"):
        assert _positive(v[key]), (key, v[key])
    for decode in (v["decode_batch_1"], v["decode_batch_n"]):
        assert _positive(decode["tokens_per_s"]) and _positive(decode["seconds_per_step"])
        assert all(0 < n <= decode["batch"] * (decode["new_tokens"] - 1) for n in decode["decode_tokens"])
    assert v["time_to_first_token_s"] * 1000 >= v["prefill_ms"]  # prompt encoding comes on top of prefill
    assert v["memory"]["kind"].startswith("cpu") and _positive(v["memory"]["peak_mib"])
    assert v["bandwidth_share_batch_1"] is None  # measured on a GPU only


def test_bench_model_on_a_checkpoint_measures_fp32_and_nf4(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "model.json"
    rc = main(["bench", "model", "--model", str(tmp_path / "ckpt"), "--device", "cpu", "--images", "2",
               "--repeats", "1", "--new-tokens", "3", "--batch", "2", "--out", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())
    assert list(results["variants"]) == ["fp32", "nf4"]  # the CPU default
    assert results["copy_bandwidth_gb_s"] is None
    fp32, nf4 = results["variants"]["fp32"], results["variants"]["nf4"]
    for variant in (fp32, nf4):
        _check_variant(variant)
        assert variant["image_tokens"] == tiny_model.num_image_tokens
        assert variant["decode_batch_n"]["batch"] == 2
    assert nf4["overrides"]["quantization"] == "4bit" and nf4["linear4bit_layers"] > 0
    assert fp32["overrides"]["quantization"] == "none" and fp32["linear4bit_layers"] == 0
    # The tiny LLM ties its embeddings, so a step reads every fp32 weight; 4-bit weights are fewer bytes.
    assert fp32["llm_bytes_read_per_token"] == sum(p.numel() * 4 for p in tiny_model.llm.parameters())
    assert nf4["llm_bytes_read_per_token"] < fp32["llm_bytes_read_per_token"]
    table = capsys.readouterr().out
    assert "| fp32 |" in table and "| nf4 |" in table and table.rstrip().endswith("| - |")


def test_bench_model_random_tiny_llama_builds_the_requested_architecture(tmp_path):
    results = run_model_bench(None, "cpu", str(tmp_path / "model.json"), ["fp32"], images=2, repeats=1,
                              new_tokens=3, batch=2, random_llm="tiny-llama", random_vision="tiny-vit")
    variant = results["variants"]["fp32"]
    _check_variant(variant)
    model_type, sizes = RANDOM_LLMS["tiny-llama"]
    assert variant["llm"] == {"model_type": model_type, **sizes}
    vision = RANDOM_VISIONS["tiny-vit"]["vision_cfg"]
    assert variant["image_tokens"] == (vision["image_size"] // vision["patch_size"]) ** 2
    assert results["model"] == "random tiny-llama + tiny-vit"
    assert json.loads((tmp_path / "model.json").read_text())["variants"]["fp32"]["llm"] == variant["llm"]


@pytest.mark.parametrize("name, model_type, kv_heads, intermediate, billions", [
    ("llama-7b", "llama", 32, 11008, 6.74), ("mistral-7b", "mistral", 8, 14336, 7.24)])
def test_random_7b_configs_have_the_published_sizes(name, model_type, kv_heads, intermediate, billions):
    from transformers import AutoModelForCausalLM

    cfg = random_llm_config(name)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (model_type, 4096, 32, 32)
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size) == (kv_heads, intermediate, 32000)
    with torch.device("meta"):  # shapes only: no memory, no initialization
        llm = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in llm.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_random_vit_b_16_is_open_clips_architecture():
    import open_clip

    reference = open_clip.get_model_config("ViT-B-16")
    assert RANDOM_VISIONS["vit-b-16"] == {"embed_dim": reference["embed_dim"], "vision_cfg": reference["vision_cfg"]}


def test_bench_eval_compares_sorted_and_dataset_order_batches(tiny_model):
    image = synthetic_image(64)
    questions = [("Is there a pleural effusion in the left lung base?", image), ("Modality?", image),
                 ("Is the heart enlarged?", image)]
    b = bench_eval_batching(as_assistant(tiny_model), questions, batch_size=2, max_new_tokens=2)
    for key in ("sequential_q_per_s", "batched_q_per_s", "dataset_order_q_per_s", "speedup", "length_sorting_speedup"):
        assert _positive(b[key]), key
    assert 0 <= b["same_answers"] <= 3 and 0 <= b["same_answers_dataset_order"] <= 3
    table = markdown_eval({"model": "tiny", "task": "3 questions", "machine": "test", "eval_batching": b})
    assert "dataset order (before)" in table and "sorted by prompt length (after)" in table


@pytest.mark.parametrize("extra, message", [
    (["--variants", "fp16"], "unknown variant 'fp16'"),
    (["--variants", "fp32,fp32"], "distinct names"),
    (["--quantization", "4bit"], "use --variants"),
    (["--random-vision", "tiny-vit"], "--random-vision goes with --random-llm"),
    (["--random-llm", "gpt-9"], "--random-llm 'gpt-9'"),
    (["--new-tokens", "1", "--random-llm", "tiny-llama", "--random-vision", "tiny-vit"], "--new-tokens must be at least 2"),
])
def test_bench_model_user_errors_are_one_line(extra, message, tmp_path, capsys):
    rc = main(["bench", "model", "--device", "cpu", "--out", str(tmp_path / "m.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err
    assert not (tmp_path / "m.json").exists()
