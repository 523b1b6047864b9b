"""Training data: image-text pairs (JSONL) and LLaVA-format conversations (JSON list), validated
before training. Every bad record is reported with its file and line; without `skip_bad` the
run refuses to start, with it the bad records are dropped and counted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from vlm.errors import InputError, MedVLMError

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(MedVLMError):
    """Invalid training records; the message lists them by file and line."""


@dataclass(frozen=True)
class PairRecord:
    image: Path
    text: str
    source: str
    line: int


@dataclass(frozen=True)
class ConversationRecord:
    images: tuple[Path, ...]
    messages: tuple[dict, ...]
    source: str
    line: int
    length: int | None = None  # tokens with image tokens, when measured at load (kept for group_by_length)


def load_pairs(path: str | Path, skip_bad: bool = False, check_image: Callable | None = None) -> list[PairRecord]:
    """Read a JSONL of {"image", "text"} records, validating each."""
    path = Path(path)
    records, bad = [], []
    for line, raw in _jsonl(path):
        try:
            image = _image_path(path, raw.get("image"))
            text = raw.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InputError("'text' is missing or empty")
            _check_image(image, check_image)
            records.append(PairRecord(image, text.strip(), str(path), line))
        except (InputError, AttributeError) as e:
            bad.append(f"{path}:{line}: {e}")
    return _settle(records, bad, skip_bad, path)


def load_conversations(path: str | Path, skip_bad: bool = False, check_image: Callable | None = None,
                       measure: Callable[[ConversationRecord], int] | None = None,
                       max_length: int | None = None) -> list[ConversationRecord]:
    """Read a LLaVA JSON list ({"id", "image", "conversations": [{"from", "value"}]}) and validate.

    `measure` returns a record's length in tokens (with image tokens), kept on the record; longer than
    `max_length` is bad.
    """
    path = Path(path)
    records, bad = [], []
    for line, raw in _json_list(path):
        try:
            record = _conversation(path, line, raw)
            for image in record.images:
                _check_image(image, check_image)
            if measure is not None:
                record = replace(record, length=measure(record))
                if max_length is not None and record.length > max_length:
                    raise InputError(f"sample is {record.length} tokens long, longer than the context ({max_length})")
            records.append(record)
        except (InputError, AttributeError, TypeError) as e:
            bad.append(f"{path}:{line}: {e}")
    return _settle(records, bad, skip_bad, path)


def _conversation(path: Path, line: int, raw: dict) -> ConversationRecord:
    images = raw.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise InputError("'conversations' is missing or empty")
    messages = []
    for turn in turns:
        role = ROLES.get(turn.get("from") or turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise InputError(f"a turn needs 'from' (human/gpt) and a text 'value', got {json.dumps(turn)[:80]}")
        messages.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise InputError("the conversation has no assistant (gpt) turn")
    markers = sum(m["content"].count("<image>") for m in messages)
    if markers != len(images):
        raise InputError(f"{markers} <image> markers but {len(images)} images")
    return ConversationRecord(tuple(_image_path(path, i) for i in images), tuple(messages), str(path), line)


def _image_path(data_file: Path, value) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError("'image' is missing")
    image = Path(value)
    return image if image.is_absolute() else (data_file.parent / image)


def _check_image(image: Path, check_image: Callable | None) -> None:
    if not image.is_file():
        raise InputError(f"image {image} does not exist")
    if check_image is not None:
        try:
            check_image(image)
        except InputError as e:
            raise InputError(f"image {image} is unreadable: {e}") from None


def _settle(records: list, bad: list[str], skip_bad: bool, path: Path) -> list:
    if bad and not skip_bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(f"{len(bad)} invalid record(s) in {path}; fix them or pass --skip-bad to drop them:\n  {shown}")
    if bad:
        log.warning("dropped %d invalid record(s) of %d in %s", len(bad), len(bad) + len(records), path)
    if not records:
        raise DataError(f"{path} holds no valid records.")
    return records


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            yield number, _Unparsable(f"not valid JSON ({e.msg})")


def _json_list(path: Path) -> Iterator[tuple[int, dict]]:
    """Objects of a JSON array with the line each starts on."""
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    decoder = json.JSONDecoder()
    index = text.find("[")
    if index < 0:
        raise DataError(f"{path}: expected a JSON list of conversations.")
    index += 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        line = text.count("\n", 0, index) + 1
        try:
            obj, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg}); stopping here.") from e
        yield line, obj if isinstance(obj, dict) else _Unparsable("a record must be a JSON object")


class _Unparsable(dict):
    """Stands in for a record that could not be parsed; any use reports why."""

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    def get(self, *args):
        raise InputError(self.reason)
