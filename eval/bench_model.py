"""`medvlm bench model`: one model's speed and memory, for each precision variant in one process.

For every variant (fp32, bf16, nf4), loaded one after another: image encoder images/s, prefill ms,
time to first token, greedy decode tokens/s at batch 1 and at a larger batch, peak memory, and on
a GPU the share of the memory-bandwidth limit that batch-1 decoding reaches.

`--random-llm` builds the LLM from a transformers config with random weights (for machines that
cannot download a checkpoint): the weights are saved to a temporary folder and loaded through the
project's normal LLM loading path, so quantization works exactly as for a real model.
Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eval.bench_common import machine, write_results
from vlm.errors import ConfigError

# Sizes of the published models; only the architecture matters for speed, the weights are random.
RANDOM_LLMS = {
    "llama-7b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, vocab_size=32000)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=14336, vocab_size=32000)),
    "tiny-llama": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=512)),
}
RANDOM_VISIONS = {
    "vit-b-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}},
    "tiny-vit": {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}},
}
VARIANTS = ("fp32", "bf16", "nf4")
QUESTION = "Describe the findings in this image in detail."  # asks for a long answer: fewer early stops


def variant_overrides(name: str, device: str) -> dict:
    """The LanguageConfig overrides of a precision variant (as `--quantization`/`--dtype` would give)."""
    if name == "fp32":
        return {"quantization": "none", "dtype": "float32"}
    if name == "bf16":
        return {"quantization": "none", "dtype": "bfloat16"}
    if name == "nf4":  # the parts bitsandbytes leaves unquantized keep the device's usual precision
        return {"quantization": "4bit", "dtype": "bfloat16" if device.startswith("cuda") else "float32"}
    raise ConfigError(f"unknown variant {name!r}; choose among {', '.join(VARIANTS)}.")


def parse_variants(text: str | None, device: str) -> list[str]:
    names = [v.strip() for v in (text or ("bf16,nf4" if device.startswith("cuda") else "fp32,nf4")).split(",") if v.strip()]
    for name in names:
        variant_overrides(name, device)  # raises for an unknown name
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--variants {text!r}: give distinct names among {', '.join(VARIANTS)}, comma-separated.")
    return names


# ---- random models -----------------------------------------------------------------------------

def random_llm_config(name: str, tokenizer=None):
    """The transformers config of a `--random-llm` architecture (special token ids from `tokenizer`)."""
    from transformers import AutoConfig

    if name not in RANDOM_LLMS:
        raise ConfigError(f"--random-llm {name!r}: choose among {', '.join(RANDOM_LLMS)}.")
    model_type, sizes = RANDOM_LLMS[name]
    tokens = {}
    if tokenizer is not None:
        tokens = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return AutoConfig.for_model(model_type, tie_word_embeddings=False, **sizes, **tokens)


def _bench_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the benchmark's own prompt text (no download); prompts then
    tokenize into mostly whole words, as with a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm.config import DEFAULT_SYSTEM_PROMPT
    from vlm.prompts import VQA_PROMPT

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator([DEFAULT_SYSTEM_PROMPT, VQA_PROMPT.format(question=QUESTION), "system user assistant"] * 20,
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tokenizer


def write_random_llm(name: str, folder: Path, device: str) -> Path:
    """Save a random-weight LLM of architecture `name` and a tokenizer as a transformers folder."""
    from transformers import AutoModelForCausalLM

    tokenizer = _bench_tokenizer(min(512, RANDOM_LLMS[name][1]["vocab_size"]))
    torch.manual_seed(0)
    # Built on the target device in bf16: initializing 7B weights on a CPU takes minutes.
    with torch.device(device):
        llm = AutoModelForCausalLM.from_config(random_llm_config(name, tokenizer), dtype=torch.bfloat16)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del llm
    _release_memory(device)
    return folder


def random_model_config(llm_folder: Path, vision: str):
    """A MedVLMConfig for a random LLM folder and a `--random-vision` tower built from scratch."""
    from vlm.config import LanguageConfig, MedVLMConfig, VisionConfig

    if vision not in RANDOM_VISIONS:
        raise ConfigError(f"--random-vision {vision!r}: choose among {', '.join(RANDOM_VISIONS)}.")
    return MedVLMConfig(vision=VisionConfig(source="", arch=RANDOM_VISIONS[vision]),
                        language=LanguageConfig(source=str(llm_folder)), max_length=4096)


# ---- measurements ------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:  # give freed heap pages back, so the next variant's RSS starts low
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class MemoryMeter:
    """Peak memory while one variant is loaded and measured.

    GPU: torch.cuda.max_memory_allocated (reset before loading). CPU: the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs before loading); where it cannot be reset, the
    resident set after the run."""

    def __init__(self, device: str):
        self.device = torch.device(device)

    def start(self) -> None:
        _release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # "5" resets the peak RSS
            self.peak_resettable = True
        except OSError:
            self.peak_resettable = False
        self.base = _proc_status_bytes("VmRSS")

    def stop(self) -> dict:
        if self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device), "cuda max_memory_allocated"
        elif self.peak_resettable:
            peak, kind = _proc_status_bytes("VmHWM"), "cpu peak RSS (VmHWM)"
        else:
            peak, kind = _proc_status_bytes("VmRSS"), "cpu RSS after the run (peak not resettable)"
        return {"kind": kind, "peak_mib": peak / 2**20, "increase_mib": (peak - self.base) / 2**20}


def _proc_status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def copy_bandwidth(device: str, mib: int = 1024, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s from large device-to-device copies (each reads and writes)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    _release_memory(device)
    return 2 * mib * 2**20 * repeats / seconds


def llm_bytes_read_per_token(llm) -> int:
    """Bytes of LLM weights one decode step reads: every parameter (4-bit ones with their scales),
    except the input embedding table, of which a step reads one row, unless it is tied to the output."""
    embedding = llm.get_input_embeddings().weight
    output = llm.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    total = 0
    for p in llm.parameters():
        if p is embedding and not tied:
            continue
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: block scales
        for absmax in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None)):
            total += 0 if absmax is None else absmax.numel() * absmax.element_size()
    return total


def count_linear4bit(llm) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in llm.modules())


@torch.no_grad()
def bench_image_encoder(model, image, n_images: int, repeats: int) -> float:
    """Images/s of the vision tower + projector on a batch of `n_images` (preprocessing excluded)."""
    pixels = model.preprocess([image] * n_images)
    model.image_features(pixels)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        model.image_features(pixels)
        _sync(model.device)
        times.append(time.perf_counter() - start)
    return n_images / statistics.median(times)


def timed_generation(model, image, batch_size: int, new_tokens: int) -> dict:
    """One greedy generation of `batch_size` copies of the question, timed through the one generation
    path: time to first token (from prompt encoding), prefill (from the encoded batch to the first
    token) and decode (the steps after it, counting only tokens of sequences not yet stopped)."""
    from vlm.generation import GenerationConfig, decode_steps, stop_token_ids
    from vlm.prompts import vqa_messages

    stops = torch.tensor(sorted(stop_token_ids(model)))
    running = torch.ones(batch_size, dtype=torch.bool)
    _sync(model.device)
    start = time.perf_counter()
    batch = model.processor.generation_batch([vqa_messages(QUESTION)] * batch_size, [[image]] * batch_size)
    prepared = time.perf_counter()
    first, steps, tokens = None, 0, 0
    for token in decode_steps(model, batch, GenerationConfig(max_new_tokens=new_tokens)):
        token = token.cpu()  # waits for the device
        if first is None:
            first = time.perf_counter()
        else:
            steps, tokens = steps + 1, tokens + int(running.sum())
        running &= ~torch.isin(token, stops)
    end = time.perf_counter()
    return {"ttft_s": first - start, "prefill_s": first - prepared, "decode_s": end - first, "steps": steps,
            "tokens": tokens, "prompt_tokens": int(batch.input_ids.shape[1])}


def bench_decode(model, image, batch_size: int, new_tokens: int, repeats: int) -> dict:
    """Medians over `repeats` generations (after one warm-up) of one batch size."""
    timed_generation(model, image, batch_size, min(new_tokens, 2))  # warm-up
    runs = [timed_generation(model, image, batch_size, new_tokens) for _ in range(repeats)]
    rates = [r["tokens"] / r["decode_s"] for r in runs if r["tokens"] and r["decode_s"] > 0]
    per_step = [r["decode_s"] / r["steps"] for r in runs if r["steps"]]
    return {"batch": batch_size, "new_tokens": new_tokens, "decode_tokens": [r["tokens"] for r in runs],
            "tokens_per_s": statistics.median(rates) if rates else None,
            "seconds_per_step": statistics.median(per_step) if per_step else None,
            "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in runs),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs), "prompt_tokens": runs[0]["prompt_tokens"]}


def bench_variant(load, name: str, device: str, image, settings: dict, bandwidth: float | None) -> dict:
    """Load variant `name` with `load(overrides)` and measure it; the model is freed afterwards."""
    overrides = variant_overrides(name, device)
    meter = MemoryMeter(device)
    meter.start()
    start = time.perf_counter()
    model = load(overrides)
    load_s = time.perf_counter() - start
    one = bench_decode(model, image, 1, settings["new_tokens"], settings["repeats"])
    many = bench_decode(model, image, settings["batch"], settings["new_tokens"], settings["repeats"])
    encoder = bench_image_encoder(model, image, settings["images"], settings["repeats"])
    weight_bytes = llm_bytes_read_per_token(model.llm)
    share = None
    if bandwidth and one["seconds_per_step"]:
        share = weight_bytes / one["seconds_per_step"] / bandwidth
    cfg = model.llm.config
    result = {"overrides": overrides, "load_s": load_s, "image_encoder_images_per_s": encoder,
              "prefill_ms": one["prefill_ms"], "time_to_first_token_s": one["ttft_s"],
              "prompt_tokens": one["prompt_tokens"], "image_tokens": model.num_image_tokens,
              "decode_batch_1": one, "decode_batch_n": many, "memory": meter.stop(),
              "llm_bytes_read_per_token": weight_bytes, "bandwidth_share_batch_1": share,
              "linear4bit_layers": count_linear4bit(model.llm),
              "llm": {k: getattr(cfg, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")}}
    del model
    _release_memory(device)
    return result


def synthetic_image(size: int = 512):
    """A fixed noisy gradient: content does not change speed, and no data file is needed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 200, size)[None, :] + rng.normal(0, 20, (size, size))
    return Image.fromarray(np.clip(gradient, 0, 255).astype("uint8")).convert("RGB")


def run_model_bench(model_ref: str | None, device: str, out: str, variants: list[str], images: int = 16,
                    repeats: int = 5, new_tokens: int = 32, batch: int = 8, random_llm: str | None = None,
                    random_vision: str | None = None, image=None) -> dict:
    """Measure every variant of one model (a checkpoint, or random weights) in this process."""
    from vlm.model import MedVLM

    for option, value, least in (("--images", images, 1), ("--repeats", repeats, 1), ("--new-tokens", new_tokens, 2),
                                 ("--batch", batch, 1)):
        if value < least:
            raise ConfigError(f"{option} must be at least {least}, got {value}.")
    settings = {"images": images, "repeats": repeats, "new_tokens": new_tokens, "batch": batch}
    image = image if image is not None else synthetic_image()
    # Measured before any model is loaded, with the whole device memory free.
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else None
    gpu = f"; {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""
    results = {"model": model_ref, "device": device, "machine": machine() + gpu, "settings": settings,
               "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="medvlm-random-llm-") as tmp:
        if random_llm:
            config = random_model_config(write_random_llm(random_llm, Path(tmp), device), random_vision or "vit-b-16")
            results["model"] = f"random {random_llm} + {random_vision or 'vit-b-16'}"

            def load(overrides):
                torch.manual_seed(0)  # the same projector and vision weights for every variant
                return MedVLM.build(config.replace(language=overrides), device=device)
        else:
            def load(overrides):
                return MedVLM.from_pretrained(model_ref, device=device, merge_lora=True, **overrides)  # as inference loads
        for name in variants:
            results["variants"][name] = bench_variant(load, name, device, image, settings, bandwidth)
    write_results(results, out)
    return results


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_model(results: dict) -> str:
    s = results["settings"]
    any_variant = next(iter(results["variants"].values()))
    bandwidth = results["copy_bandwidth_gb_s"]
    lines = [f"Model `{results['model']}` on {results['device']}; {results['machine']}.",
             f"Prompt: {any_variant['prompt_tokens']} tokens ({any_variant['image_tokens']} of them image tokens); "
             f"greedy, {s['new_tokens']} new tokens at most; medians of {s['repeats']} runs; "
             f"memory: {any_variant['memory']['kind']}"
             + (f"; device copy bandwidth {bandwidth:.0f} GB/s." if bandwidth else "."), "",
             f"| variant | image encoder (images/s, batch {s['images']}) | prefill (ms) | time to first token (s) "
             f"| decode batch 1 (tokens/s) | decode batch {s['batch']} (tokens/s) | peak memory, MiB (+ added) "
             "| share of bandwidth limit, batch 1 |", "|---|---|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        share = v["bandwidth_share_batch_1"]
        lines.append(f"| {name} | {v['image_encoder_images_per_s']:.1f} | {v['prefill_ms']:.1f} "
                     f"| {v['time_to_first_token_s']:.3f} | {_fmt(v['decode_batch_1']['tokens_per_s'], '.1f')} "
                     f"| {_fmt(v['decode_batch_n']['tokens_per_s'], '.1f')} "
                     f"| {v['memory']['peak_mib']:.0f} (+{v['memory']['increase_mib']:.0f}) "
                     f"| {'-' if share is None else f'{100 * share:.0f}%'} |")
    return "\n".join(lines)
