"""Batched, resumable evaluation: generate answers, score them under stated rules, write results.

The orchestrator: `evaluate` generates (eval/predict.py: resumable, one JSONL line per question),
scores (eval/score.py) and writes results.json / results.md / plots (eval/results.py);
`score_predictions` does the last two for another system's answers.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

from eval.predict import BLANK_PREDICTIONS, PREDICTIONS, generate_predictions, prediction_texts, read_predictions
from eval.results import write_results
from eval.score import read_answer_file, score
from eval.tasks import Task, load_task
from vlm.backends import as_assistant
from vlm.errors import ConfigError

SETTINGS = "run_settings.json"
DEFAULT_MAX_NEW_TOKENS = {"vqa": 16, "report": 160}
# What must match for a rerun to reuse the predictions already in an output folder. `labels` (nih-findings'
# gold, recorded only when it is not the default NIH labels, so older run folders still resume) is among them.
_RESUME_KEYS = ("model", "backend", "model_revision", "task", "split", "source", "labels", "prompt_style",
                "prompt_template", "system_prompt", "max_new_tokens")


def evaluate(assistant, task: Task, out_dir: str | Path, batch_size: int = 8, max_new_tokens: int | None = None,
             ablate_image: bool = False, bootstrap: int = 1000, *, model_ref: str = "", progress: bool = True,
             on_batch=None) -> dict:
    """Generate (resuming), score and write results.json / results.md / plots into `out_dir`.

    `assistant` is any vlm.assistant.Assistant (a bare MedVLM is wrapped). `on_batch(done, total)`
    is called after each saved batch. Returns the results dict.
    """
    if batch_size < 1:
        raise ConfigError("batch size must be at least 1.")
    assistant = as_assistant(assistant, model_ref).eval()  # no dropout: greedy answers must be reproducible
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    described = assistant.describe()
    prompts = assistant.prompts
    settings = {"model": model_ref or assistant.reference, "backend": assistant.backend,
                "model_revision": described.get("revision"), "task": task.name, "split": task.split,
                "source": task.source, "prompt_style": prompts.name,
                "prompt_template": prompts.report if task.kind == "report" else prompts.vqa,
                "system_prompt": described.get("system_prompt"),
                "max_new_tokens": max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task.kind]}
    if task.gold is not None:
        settings = _with_labels(settings, task.gold["labels"])
    history = _check_settings(out / SETTINGS, settings)
    start = time.perf_counter()
    generated, seconds = generate_predictions(assistant, task, out / PREDICTIONS, batch_size, settings["max_new_tokens"],
                                              progress=progress, on_batch=on_batch)
    # Generation time accumulates over resumed runs, so the per-question rate survives a restart.
    if generated:
        history.append({"generated": generated, "seconds": round(seconds, 3)})
    (out / SETTINGS).write_text(json.dumps({**settings, "generation_log": history}, indent=2), encoding="utf-8")
    blank = None
    if ablate_image:
        generate_predictions(assistant, task, out / BLANK_PREDICTIONS, batch_size, settings["max_new_tokens"],
                             blank_image=True, progress=progress, on_batch=on_batch)
        blank = prediction_texts(read_predictions(out / BLANK_PREDICTIONS))
    results = score(task, prediction_texts(read_predictions(out / PREDICTIONS)), bootstrap=bootstrap, blank=blank)
    results = {**settings, "decoding": {"greedy": True, "temperature": 0.0, "max_new_tokens": settings["max_new_tokens"],
                                        "batch_size": batch_size, "order": "batches of items sorted by prompt length"},
               **results, "timing": _timing(history, generated, time.perf_counter() - start),
               "model_info": assistant.describe(),  # again: an endpoint's fingerprint is known after it answered
               "backend_usage": assistant.usage(), "versions": package_versions()}
    write_results(out, results)
    return results


def _with_labels(settings: dict, labels: str) -> dict:
    """`settings` with the gold label choice after `source` (run_settings.json and results.json order)."""
    keys = list(settings)
    at = keys.index("source") + 1
    return {**{k: settings[k] for k in keys[:at]}, "labels": labels, **{k: settings[k] for k in keys[at:]}}


def _timing(history: list[dict], generated_now: int, seconds_now: float) -> dict:
    generated = sum(h["generated"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    return {"generated": generated, "generated_this_run": generated_now, "generation_seconds": round(seconds, 3),
            "seconds_per_question": round(seconds / generated, 4) if generated else None,
            "questions_per_second": round(generated / seconds, 3) if generated and seconds else None,
            "seconds_this_run": round(seconds_now, 3), "runs": len(history)}


def _check_settings(path: Path, settings: dict) -> list[dict]:
    """Refuse to mix predictions of different runs in one folder; return the earlier runs' log."""
    if not path.exists():
        path.write_text(json.dumps({**settings, "generation_log": []}, indent=2), encoding="utf-8")
        return []
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = [k for k in _RESUME_KEYS if old.get(k) != settings.get(k)]
    if changed:
        raise ConfigError(f"{path.parent} holds predictions made with a different {', '.join(changed)}; "
                          "choose another --out folder (or delete that one).")
    return list(old.get("generation_log", []))


def package_versions() -> dict[str, str | None]:
    names = ("torch", "transformers", "open_clip_torch", "medvlm")
    installed = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
    return {name: installed.get(name.replace("_", "-")) for name in names}


def score_predictions(task_name: str, predictions_file: str | Path, data: str | Path, split: str = "test",
                      out_dir: str | Path | None = None, bootstrap: int = 1000, labels: str | None = None) -> dict:
    """Score another system's answers on a task under the same rules; write results if `out_dir`.
    `labels`: nih-findings' gold (eval.tasks.NIH_LABELS), as for `load_task`."""
    task = load_task(task_name, data, split, labels=labels)
    answers = read_answer_file(predictions_file)
    known = {it.id for it in task.items}
    results = score(task, answers, bootstrap=bootstrap)
    results = {"model": f"predictions file {predictions_file}", "task": task.name, "split": task.split,
               "source": task.source, **({"labels": task.gold["labels"]} if task.gold else {}), **results}
    results["counts"]["unknown_ids"] = len(set(answers) - known)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_results(Path(out_dir), results)
    return results
