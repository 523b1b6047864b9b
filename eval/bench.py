"""`medvlm bench serving` and `medvlm bench eval`: speed measurements that compare variants in one
process (`medvlm bench model`, one model per precision, lives in eval/bench_model.py; `medvlm bench
lora-merge`, the LoRA adapter separate vs merged at load time, in eval/bench_lora.py).

- Follow-up turn vs first turn: time to first token of a second question about the same image
  with the conversation cache (image and first turn reused) against the same follow-up computed
  from scratch, and against the first turn.
- API load: N concurrent `/v1/chat/completions` requests to a server on 127.0.0.1, all of which
  must be answered; latency percentiles.
- Evaluation: batched generation vs one question per `generate()` call, and length-sorted batches
  vs batches in dataset order.

Results go to a JSON file and a markdown table (docs/benchmarks.md holds the ones we measured).
Nothing here is a test: speed is measured, never asserted.
"""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time
from pathlib import Path

import torch

from eval.bench_common import machine, write_results
from vlm.errors import ConfigError
from vlm.generation import ConversationCache, GenerationConfig, TextStream


def time_to_first_token(model, messages, images, gen, session=None) -> float:
    start = time.perf_counter()
    for _ in TextStream(model, messages, images, gen, session=session):
        return time.perf_counter() - start
    return time.perf_counter() - start


def bench_follow_up(model, image, repeats: int = 5, max_new_tokens: int = 16) -> dict:
    """Median time to first token: first turn, follow-up without cache, follow-up with cache."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    first = [model.processor.user_turn("What imaging modality is this?", 1)]
    times = {"first_turn": [], "follow_up_no_cache": [], "follow_up_cached": []}
    for _ in range(repeats):
        session = ConversationCache()
        times["first_turn"].append(time_to_first_token(model, first, [image], gen, session))
        reply = "".join(TextStream(model, first, [image], gen))
        follow = first + [{"role": "assistant", "content": reply},
                          {"role": "user", "content": "Is there any abnormality? Describe it briefly."}]
        # Bring the cache up to date with the reply as the app would have it after the first turn.
        list(TextStream(model, first + [{"role": "assistant", "content": reply}], [image],
                        GenerationConfig(max_new_tokens=1), session=session))
        times["follow_up_no_cache"].append(time_to_first_token(model, follow, [image], gen))
        times["follow_up_cached"].append(time_to_first_token(model, follow, [image], gen, session))
    medians = {k: statistics.median(v) for k, v in times.items()}
    medians["speedup_cached_vs_no_cache"] = medians["follow_up_no_cache"] / medians["follow_up_cached"]
    return {"seconds": times, "median_s": medians, "repeats": repeats}


def bench_api_load(model, image_png: bytes, requests: int = 16, max_tokens: int = 16,
                   concurrency: int = 1, timeout: float = 600.0) -> dict:
    """Send `requests` concurrent chat requests to a local server; latency of each and percentiles."""
    import httpx
    import uvicorn

    from serve.api import create_api
    from serve.engine import Engine

    engine = Engine(model, concurrency=concurrency, queue_size=requests)
    server = uvicorn.Server(uvicorn.Config(create_api(engine), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    data_url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    latencies: list[float | None] = [None] * requests
    statuses: list[int] = [0] * requests

    def one(i: int) -> None:
        body = {"model": "medvlm", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": f"Question {i}: what imaging modality is this?"}]}]}
        start = time.perf_counter()
        response = httpx.post(url, json=body, timeout=timeout)
        statuses[i] = response.status_code
        latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout)
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(30)
    done = sorted(t for t in latencies if t is not None)
    pct = {f"p{q}": done[min(len(done) - 1, int(round(q / 100 * (len(done) - 1))))] for q in (50, 90, 99)} if done else {}
    return {"requests": requests, "answered_200": statuses.count(200), "statuses": statuses, "wall_s": wall,
            "latency_s": pct, "max_tokens": max_tokens, "engine_concurrency": concurrency}


@torch.no_grad()
def bench_eval_batching(assistant, questions: list[tuple[str, object]], batch_size: int = 16,
                        max_new_tokens: int = 16) -> dict:
    """Questions/s of batched greedy generation against one question per `generate` call (the
    LLaVA-Med `model_vqa.py` loop), through the same assistant and on the same questions, and how
    often the two give the same answer. The batches are timed twice: sorted by prompt length (as
    the evaluation forms them) and in dataset order, to show what the sorting saves. For an
    endpoint, a "batch" is that many requests in flight at once."""
    from eval.predict import prompt_length_order

    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    ask = assistant.prompts.vqa_messages
    n = len(questions)
    sequential, sequential_s = _batched_answers(assistant, questions, list(range(n)), 1, gen)
    by_length = prompt_length_order(assistant, [ask(q) for q, _ in questions])  # as the evaluation batches
    batched, batched_s = _batched_answers(assistant, questions, by_length, batch_size, gen)
    in_order, in_order_s = _batched_answers(assistant, questions, list(range(n)), batch_size, gen)
    return {"questions": n, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
            "sequential_q_per_s": n / sequential_s, "batched_q_per_s": n / batched_s,
            "speedup": sequential_s / batched_s, "same_answers": sum(batched[i] == sequential[i] for i in range(n)),
            "dataset_order_q_per_s": n / in_order_s, "length_sorting_speedup": in_order_s / batched_s,
            "same_answers_dataset_order": sum(in_order[i] == sequential[i] for i in range(n))}


def _batched_answers(assistant, questions, order: list[int], batch_size: int, gen) -> tuple[dict[int, str], float]:
    """Answers by question index, generated in batches cut from `order`, and the seconds taken."""
    start = time.perf_counter()
    answers: dict[int, str] = {}
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        replies = assistant.generate([assistant.prompts.vqa_messages(questions[i][0]) for i in chunk],
                                     [[questions[i][1]] for i in chunk], gen)
        answers.update(zip(chunk, replies))
    return answers, time.perf_counter() - start


def run_serving_bench(model, model_ref: str, image_path: str, out: str, requests: int = 16, repeats: int = 5) -> dict:
    from vlm.imaging import load_image

    image = load_image(image_path).to_pil()
    png = io.BytesIO()
    image.save(png, format="PNG")
    results = {"model": model_ref, "image": Path(image_path).name, "machine": machine(),
               "follow_up": bench_follow_up(model, image, repeats=repeats),
               "api_load": bench_api_load(model, png.getvalue(), requests=requests)}
    write_results(results, out)
    return results


def markdown(results: dict) -> str:
    f, a = results["follow_up"]["median_s"], results["api_load"]
    lines = [f"Model `{results['model']}`, image `{results['image']}`; {results['machine']}.", "",
             "| time to first token (median of %d) | seconds |" % results["follow_up"]["repeats"], "|---|---|",
             f"| first turn | {f['first_turn']:.3f} |", f"| follow-up, recomputed from scratch | {f['follow_up_no_cache']:.3f} |",
             f"| follow-up, conversation cache | {f['follow_up_cached']:.3f} |",
             f"| speed-up of the cache | {f['speedup_cached_vs_no_cache']:.2f}x |", "",
             f"| {a['requests']} concurrent API requests ({a['max_tokens']} tokens max, engine concurrency "
             f"{a['engine_concurrency']}) | value |", "|---|---|",
             f"| answered with 200 | {a['answered_200']} of {a['requests']} |", f"| wall time | {a['wall_s']:.2f} s |"]
    lines += [f"| latency {k} | {v:.2f} s |" for k, v in a["latency_s"].items()]
    return "\n".join(lines)


def run_eval_bench(assistant, model_ref: str, vqa_rad: str, out: str, limit: int = 64, batch_size: int = 16) -> dict:
    from eval.tasks import load_task
    from vlm.imaging import load_image

    task = load_task("vqa-rad", vqa_rad, split="test", limit=limit)
    questions = [(item.question, load_image(item.image).to_pil()) for item in task.items]
    results = {"model": model_ref, "task": f"vqa-rad test, first {len(questions)} questions", "machine": machine(),
               "model_info": assistant.describe(),
               "eval_batching": bench_eval_batching(assistant, questions, batch_size=batch_size)}
    write_results(results, out)
    return results


def markdown_eval(results: dict) -> str:
    b = results["eval_batching"]
    return "\n".join([
        f"Model `{results['model']}`, {results['task']}; {results['machine']}.", "",
        f"| greedy, {b['max_new_tokens']} new tokens max | questions/s |", "|---|---|",
        f"| one question per `generate` call (LLaVA-Med style) | {b['sequential_q_per_s']:.2f} |",
        f"| length-sorted batches of {b['batch_size']} | {b['batched_q_per_s']:.2f} |",
        f"| speed-up | {b['speedup']:.2f}x |",
        f"| same answers | {b['same_answers']} of {b['questions']} |", "",
        "| length sorting (same run) | questions/s |", "|---|---|",
        f"| batches of {b['batch_size']} in dataset order (before) | {b['dataset_order_q_per_s']:.2f} |",
        f"| batches of {b['batch_size']} sorted by prompt length (after) | {b['batched_q_per_s']:.2f} |",
        f"| speed-up of sorting | {b['length_sorting_speedup']:.2f}x |",
        f"| same answers as one at a time, dataset order | "
        f"{b['same_answers_dataset_order']} of {b['questions']} |"])


def add_commands(sub) -> None:
    from eval.bench_model import RANDOM_LLMS, RANDOM_VISIONS, VARIANTS
    from vlm.options import add_model_options

    p = sub.add_parser("bench", help="speed benchmarks (each compares two variants in one run)")
    kinds = p.add_subparsers(title="benchmarks", metavar="BENCH")
    s = kinds.add_parser("serving", help="follow-up vs first-turn latency and a 16-request API load test")
    add_model_options(s)
    s.add_argument("--image", required=True, help="PNG, JPEG or DICOM to ask about")
    s.add_argument("--requests", type=int, default=16)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--out", default="runs/bench/serving.json")
    s.set_defaults(run=run_bench_serving)
    e = kinds.add_parser("eval", help="batched evaluation vs one question at a time, and length-sorted vs dataset order")
    add_model_options(e, prompt_style=True)
    e.add_argument("--data", required=True, help="the vqa_rad folder")
    e.add_argument("--limit", type=int, default=64, help="first N test questions")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--out", default="runs/bench/eval.json")
    e.set_defaults(run=run_bench_eval)
    m = kinds.add_parser("model", help="one model's encoder, prefill, decode speed and memory, per precision")
    add_model_options(m)
    m.add_argument("--variants", default=None,
                   help=f"comma-separated among {', '.join(VARIANTS)} (default: fp32,nf4 on CPU, bf16,nf4 on GPU)")
    m.add_argument("--images", type=int, default=16, help="image encoder batch size")
    m.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    m.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per generation at most")
    m.add_argument("--batch", type=int, default=8, help="the larger decode batch size")
    m.add_argument("--image", default=None, help="PNG, JPEG or DICOM to use (default: a synthetic image)")
    m.add_argument("--random-llm", default=None, help=f"random weights instead of --model: {', '.join(RANDOM_LLMS)}")
    m.add_argument("--random-vision", default=None,
                   help=f"with --random-llm: {', '.join(RANDOM_VISIONS)} (default: vit-b-16)")
    m.add_argument("--out", default="runs/bench/model.json")
    m.set_defaults(run=run_bench_model)
    from eval.bench_lora import add_command as add_lora_merge

    add_lora_merge(kinds)


def run_bench_eval(args) -> int:
    from vlm.options import load_assistant_from_args

    assistant = load_assistant_from_args(args, concurrency=args.batch_size)
    try:
        print(markdown_eval(run_eval_bench(assistant, args.model, args.data, args.out, args.limit, args.batch_size)))
    finally:
        assistant.close()
    return 0


def run_bench_serving(args) -> int:
    from vlm.options import load_model_from_args

    model = load_model_from_args(args)
    print(markdown(run_serving_bench(model, args.model, args.image, args.out, args.requests, args.repeats)))
    return 0


def run_bench_model(args) -> int:
    from eval.bench_model import markdown_model, parse_variants, random_llm_config, random_model_config, run_model_bench
    from vlm.options import pick_device

    if args.quantization is not None or args.dtype is not None:
        raise ConfigError("bench model sets precision per variant: use --variants instead of --quantization/--dtype.")
    if args.random_vision and not args.random_llm:
        raise ConfigError("--random-vision goes with --random-llm.")
    if args.random_llm and args.model != "demo":
        raise ConfigError("--random-llm builds its own model: leave out --model.")
    if args.random_llm:  # fail before anything slow
        random_llm_config(args.random_llm)
        random_model_config(Path("."), args.random_vision or "vit-b-16")
    device = pick_device(args.device)
    image = None
    if args.image:
        from vlm.imaging import load_image

        image = load_image(args.image).to_pil()
    results = run_model_bench(None if args.random_llm else args.model, device, args.out,
                              parse_variants(args.variants, device), args.images, args.repeats, args.new_tokens,
                              args.batch, args.random_llm, args.random_vision, image)
    print(markdown_model(results))
    return 0
