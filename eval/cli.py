"""`medvlm eval TASK ...`, `medvlm eval score TASK ...`, `medvlm eval compare RUN_A RUN_B` and
`medvlm eval image-use CHECK ...` (does a model use its image? eval/image_use.py).

Heavy imports (torch, the model) happen inside the commands, so `medvlm --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.tasks import TASKS


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a benchmark, score answer files, compare runs")
    tasks = p.add_subparsers(title="tasks", metavar="TASK")
    for name in TASKS:
        _add_task(tasks, name)
    s = tasks.add_parser("score", help="score another system's answers (JSONL id+prediction, or LLaVA-Med "
                                       "question_id+text) under the same rules")
    s.add_argument("task", choices=TASKS)
    s.add_argument("--predictions", type=Path, required=True, help="answers file (JSONL or JSON list)")
    _add_data_options(s)
    s.add_argument("--out", type=Path, default=None, help="folder for results.json, results.md and plots")
    s.set_defaults(run=run_score)
    c = tasks.add_parser("compare", help="side-by-side table of two runs' headline numbers")
    c.add_argument("run_a", type=Path, help="run folder (or its results.json)")
    c.add_argument("run_b", type=Path, help="run folder (or its results.json)")
    c.set_defaults(run=run_compare)
    checks = _add_image_use(tasks)
    for command in [*tasks.choices.values(), *checks]:  # --debug is accepted after the task too, as after any command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _add_image_use(tasks) -> list[argparse.ArgumentParser]:
    """`image-use loss-gap|probe|nih-probe`; returns the three check parsers."""
    u = tasks.add_parser("image-use", help="does a model use its image? answer loss with a black image, "
                                           "probes of the image tower's pooled tokens")
    sub = u.add_subparsers(dest="check", required=True, metavar="CHECK")
    gap = sub.add_parser("loss-gap", help="answer loss with the real image vs a black one")
    gap.add_argument("--data", required=True, help="LLaVA conversations JSON")
    gap.add_argument("--n", type=int, default=40, help="conversations, drawn with seed 0")
    probe = sub.add_parser("probe", help="organ/modality from the image tower's pooled tokens")
    probe.add_argument("--vqa-rad", required=True, help="folder with trainset.json, testset.json, images/")
    findings = sub.add_parser("nih-probe", help="NIH findings from the image tower's pooled tokens, scored as reports")
    findings.add_argument("--nih", required=True, help="folder with labels.csv and images/")
    for p in (gap, probe, findings):
        p.add_argument("--model", default="demo")
        p.set_defaults(run=run_image_use)
    return [gap, probe, findings]


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="the dataset's folder or file")
    p.add_argument("--split", default="test", help="split to use (default: test)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals, 0 for none")
    # Every task parser takes it so that other tasks refuse it in one line (eval.tasks.load_task).
    p.add_argument("--labels", default=None, metavar="nih|v2020|expert",
                   help="nih-findings only: the gold labels, the NIH labels (default), Data_Entry_2017_v2020's "
                        "(findings_v2020) or the Google 2019 expert labels on the images they cover (expert); the "
                        "last two need a folder from `medvlm train nih-tables`")


def _add_task(tasks, name: str) -> None:
    from vlm.options import add_model_options

    p = tasks.add_parser(name, help=f"evaluate a model on {name}")
    _add_data_options(p)
    p.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes there)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 for VQA, 160 for reports")
    p.add_argument("--ablate-image", action="store_true", help="also answer with a blank image and report the delta")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at once for an openai: endpoint (default: 4)")
    add_model_options(p, prompt_style=True)
    p.set_defaults(run=run_eval, task=name)


def run_eval(args) -> int:
    from eval.tables import markdown
    from eval.run import evaluate
    from eval.tasks import load_task
    from vlm.options import load_assistant_from_args

    task = load_task(args.task, args.data, split=args.split, limit=args.limit, labels=args.labels)
    assistant = load_assistant_from_args(args, concurrency=args.concurrency)
    try:
        results = evaluate(assistant, task, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           ablate_image=args.ablate_image, bootstrap=args.bootstrap, model_ref=args.model,
                           progress=not args.no_progress)
    finally:
        assistant.close()
    print(markdown(results))
    print(f"results in {args.out}")
    return 0


def run_score(args) -> int:
    from eval.tables import markdown
    from eval.run import score_predictions

    results = score_predictions(args.task, args.predictions, args.data, split=args.split, out_dir=args.out,
                                bootstrap=args.bootstrap, labels=args.labels)
    print(markdown(results))
    return 0


def run_compare(args) -> int:
    from eval.results import compare

    print(compare(args.run_a, args.run_b))
    return 0


def run_image_use(args) -> int:
    import json

    from eval.image_use import loss_gap, nih_probe, tower_probe
    from vlm.model import MedVLM

    model = MedVLM.from_pretrained(args.model).eval()
    if args.check == "loss-gap":
        result = loss_gap(model, args.data, args.n)
    elif args.check == "probe":
        result = tower_probe(model, args.vqa_rad)
    else:
        result = nih_probe(model, args.nih)
    print(json.dumps(result, indent=1))
    return 0
