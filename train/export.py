"""`medvlm export --merge RUN/final OUT`: a LoRA run on a transformers model as a plain transformers
folder with the adapter merged into the weights, which `AutoModelForImageTextToText.from_pretrained`,
`vllm serve OUT` and `--model OUT` load with no peft. Registered by train/cli.py's add_commands."""

from __future__ import annotations

from vlm.hf_lora import DTYPES


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="write a LoRA run (medvlm train instruct --model ...) as a merged transformers "
                                      "folder, for vLLM and from_pretrained")
    p.add_argument("--merge", required=True, metavar="RUN", help="the run folder to merge (e.g. runs/x/final)")
    p.add_argument("out", help="a new folder for the merged model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="the merged weights' dtype (default: the run's; the base is loaded unquantized either way)")
    p.add_argument("--device", default="cpu", help="where the merge runs (default: cpu; the whole base must fit)")
    p.set_defaults(run=run_export)


def run_export(args) -> int:
    from vlm.hf_lora import merge_run

    out = merge_run(args.merge, args.out, dtype=args.dtype, device=args.device)
    print(f"merged {args.merge} into {out}: load it with AutoModelForImageTextToText.from_pretrained, "
          f"`vllm serve {out}` or --model {out}")
    return 0
