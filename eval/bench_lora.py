"""`medvlm bench lora-merge`: a checkpoint's LoRA adapter kept separate (peft layers: every
projection computes base(x) + B(A(x))) against merged into the LLM's weights at load time
(`MedVLM.from_pretrained(..., merge_lora=True)`, peft `merge_and_unload`).

Each repeat loads both variants, one after the other (the order alternates between repeats), and
measures on the same inputs: load time (the merge included), time to first token of one greedy
chat reply with the repetition guard (`GenerationConfig.guarded`, as chat and the app use it),
decode tokens/s over a fixed number of guarded greedy tokens (stop tokens barred), and a batch of VQA-RAD questions through the evaluation path
(`eval.predict.generate_predictions`, greedy). Medians are reported, with whether the two
variants gave the same greedy tokens and answers and the largest absolute logit difference on the
chat prompt. Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from eval.bench_common import machine, write_results

VARIANTS = ("separate", "merged")
QUESTION = "Describe the findings in this image in detail."  # asks for a long answer: fewer early stops


def load_variant(model_ref: str, variant: str, device: str, overrides: dict):
    """The model with its adapter `variant` ("separate" or "merged"), and the seconds the load took."""
    from vlm.model import MedVLM

    start = time.perf_counter()
    model = MedVLM.from_pretrained(model_ref, device=device, merge_lora=variant == "merged", **overrides)
    return model.eval(), time.perf_counter() - start


def lora_layers(model) -> int:
    """peft LoRA layers left in the LLM (0 once merged)."""
    return sum(hasattr(m, "lora_A") for m in model.llm.modules())


@torch.no_grad()
def chat_reply(model, image, new_tokens: int) -> dict:
    """One guarded greedy reply at batch 1, as chat asks it (to its stop token, at most `new_tokens`):
    time to first token (from the messages, prompt encoding included) and the token ids."""
    from vlm.generation import GenerationConfig, decode_steps, stop_token_ids

    stops = stop_token_ids(model)
    gen = GenerationConfig(max_new_tokens=new_tokens).guarded()
    messages = model.processor.with_markers([{"role": "user", "content": QUESTION}], 1)
    start = time.perf_counter()
    batch = model.processor.generation_batch([messages], [[image]])
    ids, first = [], None
    for token in decode_steps(model, batch, gen):
        t = int(token[0])
        if first is None:
            first = time.perf_counter()
        ids.append(t)
        if t in stops:
            break
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_s": end - first, "ids": ids}


@torch.no_grad()
def fixed_decode(model, image, new_tokens: int) -> dict:
    """Exactly `new_tokens` guarded greedy tokens at batch 1 after the chat prompt, the stop tokens
    barred (`min_new_tokens`: the demo answers in a few tokens; a decode rate needs more): the
    tokens after the first one per second."""
    from vlm.generation import GenerationConfig, decode_steps

    messages = model.processor.with_markers([{"role": "user", "content": QUESTION}], 1)
    batch = model.processor.generation_batch([messages], [[image]])
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens).guarded()
    ids, first = [], None
    for token in decode_steps(model, batch, gen):
        ids.append(int(token[0]))
        if first is None:
            first = time.perf_counter()
    seconds = time.perf_counter() - first
    return {"tokens_per_s": (len(ids) - 1) / seconds if len(ids) > 1 else None, "ids": ids}


@torch.no_grad()
def prompt_logits(model, image) -> torch.Tensor:
    """The chat prompt's next-token logits at every position, float32 on the CPU."""
    messages = model.processor.with_markers([{"role": "user", "content": QUESTION}], 1)
    batch = model.processor.generation_batch([messages], [[image]])
    return model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits.float().cpu()


def eval_batches(model, task, batch_size: int, max_new_tokens: int) -> tuple[list[str], float]:
    """The task's answers through the evaluation path (greedy, length-sorted batches) and the seconds."""
    from eval.predict import generate_predictions, read_predictions
    from vlm.backends import as_assistant

    with tempfile.TemporaryDirectory(prefix="medvlm-bench-lora-") as tmp:
        path = Path(tmp) / "predictions.jsonl"
        _, seconds = generate_predictions(as_assistant(model), task, path, batch_size, max_new_tokens, progress=False)
        done = read_predictions(path)
    return [done[item.id]["prediction"] for item in task.items], seconds


def measure(model, image, task, settings: dict) -> dict:
    chat_reply(model, image, 2)  # warm-up
    reply = chat_reply(model, image, settings["new_tokens"])
    decode = fixed_decode(model, image, settings["new_tokens"])
    answers, eval_s = eval_batches(model, task, settings["batch_size"], settings["eval_new_tokens"])
    return {"ttft_s": reply["ttft_s"], "chat_ids": reply["ids"], "decode_tokens_per_s": decode["tokens_per_s"],
            "ids": decode["ids"], "eval_s": eval_s, "eval_q_per_s": len(answers) / eval_s, "answers": answers}


def run_lora_merge_bench(model_ref: str, image, task, out: str, device: str = "cpu", repeats: int = 3,
                         new_tokens: int = 64, batch_size: int = 8, eval_new_tokens: int = 16,
                         overrides: dict | None = None) -> dict:
    """Both variants, `repeats` times each, alternating; results written to `out` (JSON) and returned."""
    settings = {"repeats": repeats, "new_tokens": new_tokens, "batch_size": batch_size,
                "eval_new_tokens": eval_new_tokens, "questions": len(task.items), "chat_question": QUESTION,
                "chat_decoding": "greedy, repetition guard (GenerationConfig.guarded)", "eval_decoding": "greedy"}
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    info: dict[str, dict] = {}
    logits: dict[str, torch.Tensor] = {}
    warm, _ = load_variant(model_ref, "separate", device, overrides or {})  # untimed: imports, file cache
    del warm
    gc.collect()
    for r in range(repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            model, load_s = load_variant(model_ref, variant, device, overrides or {})
            if r == 0:
                logits[variant] = prompt_logits(model, image)
                info[variant] = {"lora_merged": model.lora_merged, "peft_lora_layers": lora_layers(model),
                                 "llm_params": sum(p.numel() for p in model.llm.parameters())}
            runs[variant].append({"load_s": load_s, **measure(model, image, task, settings)})
            del model
            gc.collect()
    results = {"model": model_ref, "device": device, "machine": machine(), "settings": settings,
               "variants": info, "runs": runs, **compare(runs, logits)}
    write_results(results, out)
    return results


def compare(runs: dict[str, list[dict]], logits: dict[str, torch.Tensor]) -> dict:
    """Medians per variant, speed-ups of merged over separate, and how far the outputs agree."""
    keys = ("load_s", "ttft_s", "decode_tokens_per_s", "eval_q_per_s")
    medians = {v: {k: statistics.median(run[k] for run in runs[v] if run[k] is not None) for k in keys}
               for v in VARIANTS}
    sep, mer = medians["separate"], medians["merged"]
    speedup = {"load_s": sep["load_s"] / mer["load_s"], "ttft_s": sep["ttft_s"] / mer["ttft_s"],
               "decode_tokens_per_s": mer["decode_tokens_per_s"] / sep["decode_tokens_per_s"],
               "eval_q_per_s": mer["eval_q_per_s"] / sep["eval_q_per_s"]}
    reference = runs["separate"][0]
    every = [run for v in VARIANTS for run in runs[v]]
    return {"median": medians, "speedup_merged": speedup,
            "same_chat_reply": sum(run["chat_ids"] == reference["chat_ids"] for run in every),
            "same_decode_tokens": sum(run["ids"] == reference["ids"] for run in every), "runs_total": len(every),
            "same_eval_answers": min(sum(a == b for a, b in zip(run["answers"], reference["answers"]))
                                     for run in every),
            "max_abs_logit_diff": float((logits["separate"] - logits["merged"]).abs().max()),
            "max_abs_logit": float(logits["separate"].abs().max())}


def markdown_lora(results: dict) -> str:
    s, m, x = results["settings"], results["median"], results["speedup_merged"]
    sep, mer = m["separate"], m["merged"]
    rows = [("load (s), the merge included", "load_s", ".2f"), ("time to first token (s)", "ttft_s", ".3f"),
            (f"decode, batch 1, {s['new_tokens']} tokens, repetition guard (tokens/s)",
             "decode_tokens_per_s", ".1f"),
            (f"{s['questions']} VQA-RAD questions, eval path, batch {s['batch_size']} (questions/s)",
             "eval_q_per_s", ".2f")]
    lines = [f"Model `{results['model']}` on {results['device']}; {results['machine']}; medians of {s['repeats']} "
             "alternating repeats.", "",
             "| median | adapter separate | merged | merged vs separate |", "|---|---|---|---|"]
    lines += [f"| {label} | {sep[k]:{f}} | {mer[k]:{f}} | {x[k]:.2f}x |" for label, k, f in rows]
    chat = len(results["runs"]["separate"][0]["chat_ids"])
    lines += ["", f"Same greedy tokens as the first separate run: chat reply ({chat} tokens, to its stop token) "
                  f"{results['same_chat_reply']} of {results['runs_total']} runs, {s['new_tokens']}-token decode "
                  f"{results['same_decode_tokens']} of {results['runs_total']}; same eval answers: at least "
                  f"{results['same_eval_answers']} of {s['questions']} in every run; max abs logit difference on the "
                  f"chat prompt {results['max_abs_logit_diff']:.2e} (logits up to {results['max_abs_logit']:.1f})."]
    return "\n".join(lines)


def add_command(kinds) -> None:
    from vlm.options import add_model_options

    p = kinds.add_parser("lora-merge", help="LoRA adapter kept separate vs merged into the weights at load time")
    add_model_options(p)
    p.add_argument("--image", required=True, help="PNG, JPEG or DICOM to ask about")
    p.add_argument("--data", default="../shared/data/vqa_rad", help="the vqa_rad folder (default: %(default)s)")
    p.add_argument("--questions", type=int, default=16, help="first N VQA-RAD test questions (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default: 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="chat reply tokens at most (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="loads of each variant, alternating (default: 3)")
    p.add_argument("--out", default="runs/bench/lora-merge.json")
    p.set_defaults(run=run_bench_lora_merge)


def run_bench_lora_merge(args) -> int:
    from eval.tasks import load_task
    from vlm.errors import ConfigError
    from vlm.imaging import load_image
    from vlm.options import pick_device
    from vlm.sources import model_kind

    if model_kind(args.model) != "medvlm":
        raise ConfigError(f"--model {args.model}: lora-merge needs a medvlm checkpoint (demo or a folder).")
    if args.quantization not in (None, "none"):
        raise ConfigError("lora-merge merges into unquantized weights only: leave out --quantization.")
    image = load_image(args.image).to_pil()
    task = load_task("vqa-rad", args.data, split="test", limit=args.questions)
    overrides = {k: v for k, v in (("dtype", args.dtype),) if v is not None}
    results = run_lora_merge_bench(args.model, image, task, args.out, pick_device(args.device), args.repeats,
                                   args.new_tokens, args.batch_size, overrides=overrides)
    table = markdown_lora(results)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0
