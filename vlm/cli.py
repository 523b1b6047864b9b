"""`medvlm`: the one command line. This module holds `chat`, `info` and `init`; other packages add
their commands (train, eval, bench, serve) through the `medvlm.commands` entry points, each an
`add_commands(subparsers)` function, so the library names no application package.

Errors a user can cause print one line (no traceback unless --debug) and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from vlm.errors import ConfigError, MedVLMError
from vlm.generation import GenerationConfig
from vlm.options import add_model_options, add_options, collect, load_assistant_from_args, load_model_from_args
from vlm.presets import preset_names

COMMANDS_GROUP = "medvlm.commands"
GENERATION_OPTIONS = ["max_new_tokens", "temperature", "top_p", "seed", "repetition_penalty", "no_repeat_ngram_size"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except MedVLMError as e:
        if args.debug:
            raise
        print(f"medvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nmedvlm: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medvlm", description="Open medical vision-language assistant.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_chat(sub)
    _add_info(sub)
    _add_init(sub)
    add_plugin_commands(sub)
    for command in sub.choices.values():  # --debug is accepted after the command too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def add_plugin_commands(sub) -> None:
    """Let each installed `medvlm.commands` entry point add its commands. One that cannot be
    imported (a missing package or dependency) costs its commands and a one-line warning, not the
    whole command line."""
    seen = set()
    for ep in entry_points(group=COMMANDS_GROUP):
        if ep.name in seen:  # the same plugin found twice on the path
            continue
        seen.add(ep.name)
        try:
            add_commands = ep.load()
        except ImportError as e:
            print(f"medvlm: warning: command {ep.name!r} ({ep.value}) is unavailable: {e}", file=sys.stderr)
            continue
        add_commands(sub)


# ---- chat --------------------------------------------------------------------------------------

def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="ask a question about an image; the answer streams",
                       description="Ask a question about one or more images; the answer streams. Chat decodes with "
                                   "the repetition guard (--repetition-penalty 1.1, --no-repeat-ngram-size 4) unless "
                                   "you set those options; `medvlm eval` never uses it.")
    p.add_argument("question", help="the question, e.g. 'Is there a pleural effusion?'")
    p.add_argument("--image", action="append", default=[], help="PNG, JPEG or DICOM file (repeat for several)")
    p.add_argument("--window", default=None, help="CT window for DICOM: lung, mediastinum, bone, brain or CENTER,WIDTH")
    p.add_argument("--frame", type=int, default=None, help="frame of a multi-frame DICOM (default: the middle one)")
    p.add_argument("--verbose", action="store_true", help="print load time, time to first token and tokens/s")
    add_model_options(p)
    add_options(p, GenerationConfig, GENERATION_OPTIONS)
    p.set_defaults(run=run_chat)


def run_chat(args) -> int:
    from vlm.imaging import load_image

    window = _parse_window(args.window)
    images = [load_image(path, window=window, frame=args.frame).to_pil() for path in args.image]
    gen = dataclasses.replace(GenerationConfig().guarded(), **collect(args, GenerationConfig, GENERATION_OPTIONS))
    start = time.perf_counter()
    assistant = load_assistant_from_args(args)
    loaded = time.perf_counter()
    reply = assistant.stream([{"role": "user", "content": args.question}], images, gen)
    first = None
    for piece in reply:
        first = first or time.perf_counter()
        print(piece, end="", flush=True)
    end = time.perf_counter()
    print()
    if args.verbose:
        first = first or end
        # A rate needs tokens after the first one; a one-word answer has none to time.
        rate = f"{(reply.num_tokens - 1) / (end - first):.1f} tokens/s" if reply.num_tokens > 1 and end > first \
            else "no rate for a one-token answer"
        print(
            f"[load {loaded - start:.2f} s | first token {first - loaded:.2f} s | "
            f"{reply.num_tokens} tokens | {rate}]",
            file=sys.stderr,
        )
    return 0


def _parse_window(text: str | None):
    if text is None or "," not in text:
        return text
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--window {text!r}: give a preset name or CENTER,WIDTH in Hounsfield units.") from None
    return center, width


# ---- info --------------------------------------------------------------------------------------

def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show a model's sources, sizes, quantization and memory")
    add_model_options(p)
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    from vlm.sources import model_kind, resolve

    if model_kind(args.model) != "medvlm":  # a transformers model or an endpoint: what it says of itself
        assistant = load_assistant_from_args(args)
        for key, value in assistant.describe().items():
            print(f"{key:<13}{value}")
        return 0
    model = load_model_from_args(args)
    cfg = model.config
    print(f"model        {args.model} -> {resolve(args.model).location}")
    vision = cfg.vision.source or "built from scratch (weights in the checkpoint)"
    print(f"vision       {vision}; {model.vision.num_tokens} tokens of width {model.vision.width} "
          f"from block {cfg.vision.feature_layer}, input {model.vision.image_size}px")
    print(f"projector    {cfg.projector.kind}, pool {cfg.projector.pool} -> {model.num_image_tokens} image tokens")
    print(f"language     {resolve(cfg.language.source).describe()}")
    merged = " (merged into the LLM's weights for inference)" if model.lora_merged else ""
    print(f"quantization {cfg.language.quantization}; dtype {cfg.language.dtype}; LoRA rank {cfg.language.lora_r}{merged}")
    for name, module in (("vision", model.vision), ("projector", model.projector), ("language", model.llm)):
        n = sum(p.numel() for p in module.parameters())
        t = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"params       {name:<10} {n / 1e6:9.2f} M  (trainable {t / 1e6:.2f} M)")
    size = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    print(f"memory       {size / 2**20:.1f} MiB of weights and buffers on {model.device}")
    return 0


# ---- init --------------------------------------------------------------------------------------

def _add_init(sub) -> None:
    p = sub.add_parser("init", help="write a small untrained checkpoint from a preset")
    p.add_argument("out", type=Path, help="folder to create")
    p.add_argument("--preset", default="tiny", help=f"a model preset: {', '.join(preset_names())} (default: tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exist-ok", action="store_true", help="keep OUT if it already holds a checkpoint")
    p.set_defaults(run=run_init)


def run_init(args) -> int:
    import torch

    from vlm.model import MedVLM
    from vlm.presets import load_model_preset

    if args.exist_ok and (args.out / "config.json").is_file():
        print(f"{args.out} already holds a checkpoint; keeping it")
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"{args.out} exists and is not empty; choose a new folder.")
    config = load_model_preset(args.preset)
    torch.manual_seed(args.seed)
    model = MedVLM.build(config)
    model.save_pretrained(args.out)
    print(f"wrote an untrained {args.preset} checkpoint to {args.out} ({model.num_image_tokens} image tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
