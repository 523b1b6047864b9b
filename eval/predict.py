"""Batched, resumable generation: a task's answers appended to a predictions JSONL, batch by batch.

`generate_predictions` appends each batch's predictions (flushed and fsynced), so a crash loses at
most one batch and a rerun continues where it stopped; `read_predictions` reads such a file back,
cutting off a line torn by a crash.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from eval.tasks import DataError, Item, Task

PREDICTIONS, BLANK_PREDICTIONS = "predictions.jsonl", "predictions_blank.jsonl"


def generate_predictions(assistant, task: Task, path: Path, batch_size: int, max_new_tokens: int, *,
                         blank_image: bool = False, progress: bool = True, on_batch=None) -> tuple[int, float]:
    """Append the missing predictions of `task` to `path`, one batch at a time; return how many
    were generated and the seconds it took (image loading included). `assistant` is any
    vlm.assistant.Assistant; it is asked with its prompt style's task prompts."""
    from tqdm import tqdm

    from vlm.generation import GenerationConfig

    done = read_predictions(path, repair=True)
    ordered = _by_prompt_length(assistant, task)
    # Batches are cut from the full sorted list before skipping finished items, so a resumed run
    # forms the same batches (same padding, hence the same greedy answers) as an uninterrupted one.
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    todo = [b for b in ([it for it in batch if it.id not in done] for batch in batches) if b]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    total, finished = len(ordered), len(ordered) - sum(len(b) for b in todo)
    label = f"{task.name}{' (blank image)' if blank_image else ''}"
    start = time.perf_counter()
    with path.open("a", encoding="utf-8") as f, tqdm(total=total - finished, desc=label, unit="q",
                                                      disable=not progress, dynamic_ncols=True) as bar:
        for batch in todo:
            replies = assistant.generate([_messages(assistant, task, it) for it in batch],
                                         [[_image(it, blank_image)] for it in batch], gen)
            f.write("".join(json.dumps(_record(it, reply)) + "\n" for it, reply in zip(batch, replies)))
            f.flush()
            os.fsync(f.fileno())
            finished += len(batch)
            bar.update(len(batch))
            if on_batch:
                on_batch(finished, total)
    return sum(len(b) for b in todo), time.perf_counter() - start


def read_predictions(path: str | Path, repair: bool = False) -> dict[str, dict]:
    """Records of a predictions file by id. An unreadable last line (a write cut by a crash) is
    ignored, and with `repair` cut off so that appending continues on a clean line."""
    path = Path(path)
    if not path.exists():
        return {}
    raw = path.read_bytes()
    records: dict[str, dict] = {}
    good_end, pos = 0, 0
    lines = raw.split(b"\n")
    for n, line in enumerate(lines, 1):
        end = pos + len(line) + 1
        complete = n < len(lines)  # the piece after the last newline has none: torn or empty
        try:
            record = json.loads(line) if complete and line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = None
        if record is None and line.strip():
            if n < len(lines) - 1 and any(rest.strip() for rest in lines[n:]):
                raise DataError(f"{path}: line {n} is damaged and is not the last line; "
                                "delete the file or choose another output folder.")
            break
        if record is not None:
            records.setdefault(str(record["id"]), record)
        pos = good_end = end
    if repair and good_end < len(raw):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return records


def prediction_texts(records: dict[str, dict]) -> dict[str, str]:
    return {i: r.get("prediction", "") for i, r in records.items()}


def _record(item: Item, prediction: str) -> dict:
    return {"id": item.id, "question": item.question, "answer": item.answer, "prediction": prediction,
            "answer_type": item.answer_type, "question_type": item.question_type}


def _messages(assistant, task: Task, item: Item) -> list[dict]:
    prompts = assistant.prompts
    return prompts.report_messages() if task.kind == "report" else prompts.vqa_messages(item.question)


def prompt_length_order(assistant, conversations: list[list[dict]]) -> list[int]:
    """Indices of `conversations` sorted by prompt length (tokens where the assistant counts them;
    ties in given order): batches of similar length waste little compute on padding."""
    lengths = [assistant.prompt_length(c) for c in conversations]
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def _by_prompt_length(assistant, task: Task) -> list[Item]:
    return [task.items[i] for i in prompt_length_order(assistant, [_messages(assistant, task, it) for it in task.items])]


def _image(item: Item, blank: bool):
    from PIL import Image

    from vlm.imaging import load_image

    if item.image is None and item.image_bytes is None:
        raise DataError(f"item {item.id} has no image.")
    image = load_image(item.image if item.image is not None else item.image_bytes).to_pil()
    # The ablation control: a black image of the same size, so only the image content changes.
    return Image.new(image.mode, image.size) if blank else image
