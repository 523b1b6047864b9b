"""The body of POST /v1/chat/completions -> a `ChatRequest`: engine messages, image bytes and a
GenerationConfig, or an `ApiError` saying what is wrong. Pure parsing, no I/O.

Parsing refuses what JSON allows but a request cannot mean: NaN and Infinity, floats that
overflow, integers of thousands of digits, nesting too deep to parse, unpaired surrogate
escapes. OpenAI features this server does not have (tools, JSON output, log-probabilities,
presence/frequency penalties) are a 400 "not supported" rather than silently ignored; their
neutral values (`response_format` `{"type": "text"}`, `logprobs: false`, empty `tools`,
`tool_choice` "none"/"auto", penalties of 0) are accepted.

The repetition guard (`GenerationConfig.guarded()`: repetition penalty 1.1, no repeated 4-gram)
is on by default, as in the UI. The non-OpenAI fields `repetition_penalty` (1 = off; vLLM takes
it as an extra body field too) and `no_repeat_ngram_size` (0 = off), when given, replace the
guard's value of that field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from vlm.errors import ConfigError
from vlm.generation import GenerationConfig

MAX_IMAGES = 4
MAX_NEW_TOKENS = 4096
MAX_STOP = 4
MAX_CONVERSATION_ID = 128
_IMAGE_TYPES = ("image/", "application/dicom", "application/octet-stream")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error the client caused (or may retry): its HTTP status and the OpenAI error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    images: list[bytes]
    gen: GenerationConfig
    stream: bool
    include_usage: bool
    conversation_id: str | None
    """The client's own conversation id (None: a one-off conversation)."""


def model_not_found(model: str, served_model: str) -> ApiError:
    return ApiError(404, f"The model '{model[:100]}' does not exist; this server serves '{served_model}'.",
                    param="model", code="model_not_found")


# ---- JSON ----------------------------------------------------------------------------------------

def _no_constant(name: str):
    raise ApiError(400, f"The request body contains {name}, which is not a JSON number.")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"The number {text[:40]} is too large.")
    return value


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, or a 400 (never a 500, whatever the bytes)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply.") from None
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError, and integers of over 4300 digits
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if _has_lone_surrogate(body):  # "\\ud800" is valid JSON but no text: the tokenizer would fail on it
        raise ApiError(400, "The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff).")
    return body


def _has_lone_surrogate(value) -> bool:
    stack = [value]  # iterative: the body may be nested as deep as the parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
               dict: "an object", list: "a list"}


def _typed(body: dict, key: str, kind, default):
    """body[key] if it has the JSON type `kind` (an int counts as a float, a bool as neither), else a 400."""
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else kind)
    if not ok or (kind in (int, float) and isinstance(value, bool)):
        raise ApiError(400, f"'{key}' must be {_KIND_NAMES[kind]}.", param=key)
    if kind is float:
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ApiError(400, f"'{key}' is out of range.", param=key) from None
    return value


# ---- the request ---------------------------------------------------------------------------------

def parse_request(body: dict, served_model: str) -> ChatRequest:
    """Check and translate a chat completion body (see the module docstring). Messages keep their
    image parts; the model's processor places the image markers."""
    model = _typed(body, "model", str, None)
    if model is not None and model != served_model:
        raise model_not_found(model, served_model)
    check_unsupported(body)
    messages, images = parse_messages(body.get("messages"))
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with \"stream\": true.", param="stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False)
    conversation_id = _typed(body, "conversation_id", str, None)
    if conversation_id is not None and not 0 < len(conversation_id) <= MAX_CONVERSATION_ID:
        raise ApiError(400, f"'conversation_id' must be 1 to {MAX_CONVERSATION_ID} characters.",
                       param="conversation_id")
    return ChatRequest(messages, images, parse_generation(body), stream, include_usage, conversation_id)


def check_unsupported(body: dict) -> None:
    """A 400 for the OpenAI features this server does not implement (their neutral values pass)."""
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind != "text":
            raise ApiError(400, "'response_format' other than {\"type\": \"text\"} (JSON output) is not supported.",
                           param="response_format")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise ApiError(400, "'logprobs' and 'top_logprobs' are not supported.", param="logprobs")
    for key in ("tools", "functions"):
        if body.get(key) not in (None, []):
            raise ApiError(400, f"'{key}' (tool and function calling) is not supported.", param=key)
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none", "auto"):  # with no tools, "auto" calls none
            raise ApiError(400, f"'{key}' (tool and function calling) is not supported.", param=key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _typed(body, key, float, 0.0) != 0:
            raise ApiError(400, f"'{key}' is not supported; use 'repetition_penalty' (1 to 10).", param=key)


def parse_generation(body: dict) -> GenerationConfig:
    if _typed(body, "n", int, 1) != 1:
        raise ApiError(400, "Only n=1 is supported.", param="n")
    max_tokens = 256
    for key in ("max_tokens", "max_completion_tokens"):  # the second wins
        value = _typed(body, key, int, None)
        if value is not None and not 1 <= value <= MAX_NEW_TOKENS:
            raise ApiError(400, f"'{key}' must be between 1 and {MAX_NEW_TOKENS}.", param=key)
        max_tokens = value if value is not None else max_tokens
    temperature = _typed(body, "temperature", float, 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be between 0 and 2.", param="temperature")
    given = {"repetition_penalty": _typed(body, "repetition_penalty", float, None),
             "no_repeat_ngram_size": _typed(body, "no_repeat_ngram_size", int, None)}
    try:
        gen = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature,
                               top_p=_typed(body, "top_p", float, 1.0), seed=_typed(body, "seed", int, None),
                               stop=parse_stop(body.get("stop")))
        return dataclasses.replace(gen.guarded(), **{k: v for k, v in given.items() if v is not None})
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


def parse_stop(stop: Any) -> tuple[str, ...]:
    """`stop`: a string or a list of up to 4 strings (none empty)."""
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and len(stops) <= MAX_STOP and all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them.", param="stop")
    return tuple(stops)


# ---- messages ------------------------------------------------------------------------------------

def parse_messages(raw: Any) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> engine messages, whose content is a list of text and image parts
    (`{"type": "text", "text": ...}`, `{"type": "image"}`: vlm.processor makes them text, with
    markers from image parts only), and the image bytes."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.", param="messages")
    messages, blobs = [], []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant (or developer, read as "
                                "system); tool messages are not supported.", param=f"messages[{i}].role")
        if message.get("tool_calls") or message.get("function_call"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported.", param=f"messages[{i}]")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = _parts(content, i, blobs)
        else:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts.",
                           param=f"messages[{i}].content")
        messages.append({"role": _ROLES[role], "content": parts})
    if len(blobs) > MAX_IMAGES:
        raise ApiError(400, f"At most {MAX_IMAGES} images per request.", param="messages")
    return messages, blobs


def _parts(parts: list, i: int, blobs: list[bytes]) -> list[dict]:
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blobs.append(decode_data_url(url, f"messages[{i}].content[{j}]"))
            pieces.append({"type": "image"})
        else:
            raise ApiError(400, f"messages[{i}].content[{j}] must be a text or image_url part.",
                           param=f"messages[{i}].content[{j}]")
    return pieces


def decode_data_url(url: Any, where: str) -> bytes:
    """The bytes of a base64 `data:` URL (scheme and parameters in any case). Anything else
    (http, file, a path) is refused: the server must not fetch from the network or read its own
    files on a client's behalf."""
    if not isinstance(url, str) or url[:5].lower() != "data:":
        raise ApiError(400, f"{where}: images must be sent inline as data: URLs "
                            "(data:image/png;base64,... or data:application/dicom;base64,...); "
                            "this server does not fetch URLs or read server files.", param=where)
    header, comma, payload = url[5:].partition(",")
    mime, *params = header.split(";")
    if not comma or "base64" not in (p.strip().lower() for p in params):
        raise ApiError(400, f"{where}: the data: URL must be base64-encoded (data:MIME;base64,...).", param=where)
    if mime and not mime.strip().lower().startswith(_IMAGE_TYPES):
        raise ApiError(400, f"{where}: {mime[:60]!r} is not an image type; send PNG, JPEG or DICOM.", param=where)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the image data is not valid base64.", param=where) from None
