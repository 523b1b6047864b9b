"""OpenAI-compatible HTTP API: POST /v1/chat/completions, GET /v1/models, GET /health.

Images travel inside the request as `data:` URLs (PNG, JPEG, or DICOM as
`data:application/dicom;base64,...`). The server never fetches a URL and never reads a path
on its own disk: any other URL is a 400. Every error is JSON `{"error": {"message", "type"}}`
with a message a person can act on, never a traceback: bad input 400, bad credentials 401, too
large a body 413, a full queue 503.

A request may name its conversation with the (non-OpenAI) field `conversation_id`; without
one, requests carrying the same images share a conversation, so a client that resends the
whole history with the same image (the usual OpenAI pattern) reuses that image's cached prefix.
`usage.prompt_tokens_details.cached_tokens` says how many prompt tokens were reused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.engine import Engine, EngineBusy, Reply
from vlm.errors import ConfigError, MedVLMError
from vlm.generation import GenerationConfig

log = logging.getLogger(__name__)

MAX_IMAGES = 4
MAX_NEW_TOKENS = 4096
_IMAGE_TYPES = ("image/", "application/dicom", "application/octet-stream")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def create_api(engine: Engine, auth: tuple[str, str] | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The API app. `max_body_bytes` defaults to room for MAX_IMAGES images at the engine's
    byte limit, base64-encoded, plus 1 MiB of text."""
    limit = max_body_bytes or engine.max_image_bytes * 4 // 3 * MAX_IMAGES + 2**20
    app = FastAPI(title="medvlm API", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        headers = {"WWW-Authenticate": 'Basic realm="medvlm"'} if e.status == 401 else None
        return error_response(e.status, e.message, e.kind, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(400, "The request is not valid JSON of the expected shape.", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unexpected error in %s", request.url.path)
        return error_response(500, "Internal server error; see the server log.", "server_error")

    def check_auth(request: Request) -> None:
        if auth is not None and not _authorized(request.headers.get("authorization", ""), auth):
            raise ApiError(401, "Missing or wrong credentials: send HTTP Basic auth or "
                                "'Authorization: Bearer USER:PASS'.", "authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "pending": engine.pending,
                "concurrency": engine.concurrency, "queue_size": engine.queue_size}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0, "owned_by": "medvlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await _read_json(request, limit)
        return await _complete(engine, request, body)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def unknown(rest: str):
        raise ApiError(404, f"No such API route: /v1/{rest}. Known: /v1/chat/completions, /v1/models.",
                       "not_found_error")

    return app


def _authorized(header: str, auth: tuple[str, str]) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            value = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    expected = f"{auth[0]}:{auth[1]}"
    return secrets.compare_digest(value.strip().encode(), expected.encode())


async def _read_json(request: Request, limit: int) -> dict:
    too_big = ApiError(413, f"The request body is larger than the limit of {limit / 2**20:,.1f} MB.",
                       "request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_big  # refuse before reading a byte of it
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


async def _complete(engine: Engine, request: Request, body: dict):
    marker = engine.model.config.image_marker
    messages, blobs = parse_messages(body.get("messages"), marker)
    gen = parse_generation(body)
    stream = _typed(body, "stream", bool, False)
    conversation_id = _conversation_id(body, blobs)
    try:
        images = await run_in_threadpool(lambda: [engine.load_image(b).to_pil() for b in blobs])
        reply = engine.chat(conversation_id, messages, images, gen)
    except EngineBusy as e:
        raise ApiError(503, str(e), "server_busy") from None
    except MedVLMError as e:
        raise ApiError(400, str(e)) from None
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
    deltas = reply.astream()
    with _generation_errors():  # wait for the first piece, so input errors still get a proper status
        first = await _unless_disconnected(request, anext(deltas, None))
    if stream:
        return StreamingResponse(_sse(reply, deltas, first, meta), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    with _generation_errors():
        text = await _unless_disconnected(request, _rest(deltas, first))
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(reply), "logprobs": None}],
            "usage": _usage(reply)}


@contextlib.contextmanager
def _generation_errors():
    try:
        yield
    except MedVLMError as e:
        raise ApiError(400, str(e)) from None
    except RuntimeError as e:  # the engine's stand-in for a bug, with a plain message
        raise ApiError(500, str(e), "server_error") from None


async def _unless_disconnected(request: Request, awaitable):
    """Await `awaitable`, but give up (cancelling it, hence the generation) if the client leaves:
    a plain request that waits in the queue or generates has no other way to notice."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                break
        if task.done():
            return task.result()  # re-raises a generation error
    finally:
        if not task.done():  # the client left, or this handler was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    raise ApiError(400, "The client closed the connection.")  # nobody is left to read this


async def _rest(deltas: AsyncIterator[str], first: str | None) -> str:
    return (first or "") + "".join([piece async for piece in deltas])


async def _sse(reply: Reply, deltas: AsyncIterator[str], first: str | None, meta: dict) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        payload = {**meta, "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        if first:
            yield chunk({"content": first})
        async for piece in deltas:
            yield chunk({"content": piece})
        yield chunk({}, _finish(reply), usage=_usage(reply))
    except MedVLMError as e:  # headers are sent: report in-band, as OpenAI does
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
    except RuntimeError as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    finally:
        await deltas.aclose()  # the client left (or we finished): stop generating
    yield "data: [DONE]\n\n"


def _finish(reply: Reply) -> str:
    return "length" if reply.finish_reason == "length" else "stop"


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cached_tokens}}


def _conversation_id(body: dict, blobs: list[bytes]) -> str:
    given = _typed(body, "conversation_id", str, None)
    if given:
        return f"api-{given[:128]}"
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return f"api-{digest.hexdigest()[:24]}"


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _typed(body: dict, key: str, kind, default):
    """body[key] if it has the JSON type `kind` (an int counts as a float, a bool as neither), else a 400."""
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else kind)
    if not ok or (kind in (int, float) and isinstance(value, bool)):
        raise ApiError(400, f"'{key}' must be {_KIND_NAMES[kind]}.")
    return value


def parse_generation(body: dict) -> GenerationConfig:
    if _typed(body, "n", int, 1) != 1:
        raise ApiError(400, "Only n=1 is supported.")
    max_tokens = _typed(body, "max_completion_tokens", int, None) or _typed(body, "max_tokens", int, 256)
    if not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise ApiError(400, f"'max_tokens' must be between 1 and {MAX_NEW_TOKENS}.")
    temperature = _typed(body, "temperature", float, 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be between 0 and 2.")
    try:
        return GenerationConfig(max_new_tokens=max_tokens, temperature=float(temperature),
                                top_p=float(_typed(body, "top_p", float, 1.0)), seed=_typed(body, "seed", int, None))
    except ConfigError as e:
        raise ApiError(400, str(e)) from None


def parse_messages(raw: Any, marker: str) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> engine messages (text with one image marker per image) and the image bytes."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list.")
    messages, blobs = [], []
    for i, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant.")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            text = content.replace(marker, "")  # markers come from image parts only
        elif isinstance(content, list):
            text = _parts_text(content, i, marker, blobs)
        else:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts.")
        messages.append({"role": role, "content": text})
    if len(blobs) > MAX_IMAGES:
        raise ApiError(400, f"At most {MAX_IMAGES} images per request.")
    return messages, blobs


def _parts_text(parts: list, i: int, marker: str, blobs: list[bytes]) -> str:
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"].replace(marker, ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            blobs.append(decode_data_url(url, f"messages[{i}].content[{j}]"))
            pieces.append(marker)
        else:
            raise ApiError(400, f"messages[{i}].content[{j}] must be a text or image_url part.")
    return "\n".join(pieces)


def decode_data_url(url: Any, where: str) -> bytes:
    """The bytes of a base64 `data:` URL. Anything else (http, file, a path) is refused: the
    server must not fetch from the network or read its own files on a client's behalf."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, f"{where}: images must be sent inline as data: URLs "
                            "(data:image/png;base64,... or data:application/dicom;base64,...); "
                            "this server does not fetch URLs or read server files.")
    header, comma, payload = url[5:].partition(",")
    mime, *params = header.split(";")
    if not comma or "base64" not in params:
        raise ApiError(400, f"{where}: the data: URL must be base64-encoded (data:MIME;base64,...).")
    if mime and not mime.lower().startswith(_IMAGE_TYPES):
        raise ApiError(400, f"{where}: {mime!r} is not an image type; send PNG, JPEG or DICOM.")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the image data is not valid base64.") from None

