"""OpenAI-compatible HTTP API: POST /v1/chat/completions, GET /v1/models, GET /v1/models/{id},
GET /health. The body's parsing is serve/openai_schema.py; the Host, Content-Type, CORS and
login-throttle middleware is serve/web_guard.py.

Images travel inside the request as `data:` URLs (PNG, JPEG, or DICOM as
`data:application/dicom;base64,...`). The server never fetches a URL and never reads a path
on its own disk: any other URL is a 400. The engine decodes the bytes after it admitted the
request. Every error is JSON `{"error": {"message", "type", "param", "code"}}` with a message a
person can act on, never a traceback: bad input 400, bad credentials 401, an unknown model or
route 404 (`model_not_found` for a model), a wrong method 405 (with Allow), too large a body
413, a body that is not declared JSON 415, too many failed logins 429, a full queue 503 (with
Retry-After).

Conversations. A request without the (non-OpenAI) field `conversation_id` is a one-off: nothing
is cached or shared, and `usage.prompt_tokens_details.cached_tokens` is 0. A request naming
one reuses that conversation's cached prefix (its image is not encoded again when the client
resends the history with it, the usual OpenAI pattern). Conversations are keyed by the
authenticated user (with --auth) and the id, and only requests naming the same id reach the
same cache: choose a random, secret id (e.g. a UUID), since anyone who knows it can learn
from `cached_tokens` how much of a prompt it has already seen.

Logs carry request ids, counts and sizes, never message text or images.
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
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import web_guard
from serve.engine import Engine, EngineBusy, Reply
from serve.logs import exception_summary
from serve.openai_schema import (MAX_IMAGES, ApiError, ChatRequest, error_response, model_not_found, parse_json,
                                 parse_request)
from vlm.errors import MedVLMError

log = logging.getLogger(__name__)

BUSY_RETRY_AFTER_S = 1
ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}


def create_api(engine: Engine, auth: tuple[str, str] | None = None, max_body_bytes: int | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The API app. `max_body_bytes` defaults to room for MAX_IMAGES images at the engine's
    byte limit, base64-encoded, plus 1 MiB of text. `allowed_hosts`: the Host header values
    served (web_guard.HostGuard; None: the loopback names on any port). With `auth`, failed
    logins are throttled per client address (web_guard.AuthThrottle)."""
    limit = max_body_bytes or engine.max_image_bytes * 4 // 3 * MAX_IMAGES + 2**20
    app = FastAPI(title="medvlm API", docs_url=None, redoc_url=None, openapi_url="/v1/openapi.json")
    app.state.engine = engine
    _add_error_handlers(app)
    web_guard.install(app, allowed_hosts, throttle_logins=auth is not None,
                      json_paths=tuple(path for path, method in ROUTES.items() if method == "POST"))

    def user(request: Request) -> str:
        """The authenticated user ('' without --auth), or a 401."""
        if auth is None:
            return ""
        if not _authorized(request.headers.get("authorization", ""), auth):
            raise ApiError(401, "Missing or wrong credentials: send HTTP Basic auth or "
                                "'Authorization: Bearer USER:PASS'.", "authentication_error")
        return auth[0]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "pending": engine.pending,
                "concurrency": engine.concurrency, "queue_size": engine.queue_size}

    @app.get("/v1/models")
    async def models(request: Request):
        user(request)
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        user(request)
        if model_id != engine.name:
            raise model_not_found(model_id, engine.name)
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        who = user(request)
        body = parse_json(await _read_body(request, limit))
        chat = parse_request(body, engine.name)
        return await _complete(engine, request, chat, who)

    @app.api_route("/health", methods=["POST", "PUT", "DELETE", "PATCH", "OPTIONS"], include_in_schema=False)
    @app.api_route("/v1/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
                   include_in_schema=False)
    async def other(request: Request):
        path = request.url.path
        allowed = ROUTES.get(path.rstrip("/")) or ("GET" if path.startswith("/v1/models/") else None)
        if allowed:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {allowed}.",
                           headers={"Allow": allowed})
        raise ApiError(404, f"No such API route: {path[:200]}. Known: /v1/chat/completions, /v1/models.",
                       "not_found_error")

    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        headers = dict(e.headers or {})
        if e.status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="medvlm"'
        return error_response(e.status, e.message, e.kind, e.param, e.code, headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), kind, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(400, "The request is not valid JSON of the expected shape.", "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        # The traceback's frames but not the exception's message, which may quote the request.
        log.error("unexpected error in %s\n%s", web_guard.loggable_path(request.url.path), exception_summary(e))
        return error_response(500, "Internal server error; see the server log.", "server_error")


def _model_card(engine: Engine) -> dict:
    return {"id": engine.name, "object": "model", "created": 0, "owned_by": "medvlm"}


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


async def _read_body(request: Request, limit: int) -> bytes:
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
    return b"".join(chunks)


def conversation_key(user: str, conversation_id: str | None) -> str | None:
    """The engine's key for a client's conversation: by user and id (None stays a one-off).
    The id is hashed, so that the engine's logs (which show a key's start) never hold it."""
    if conversation_id is None:
        return None
    digest = hashlib.sha256(conversation_id.encode()).hexdigest()[:32]
    return f"api-{user}-{digest}" if user else f"api-{digest}"


async def _complete(engine: Engine, request: Request, chat: ChatRequest, user: str):
    key = conversation_key(user, chat.conversation_id)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
    log.info("%s: %d messages, %d images (%d bytes), stream=%s, conversation %s", meta["id"][:17],
             len(chat.messages), len(chat.images), sum(map(len, chat.images)), chat.stream, (key or "one-off")[:24])
    try:
        reply = engine.chat(key, chat.messages, chat.images, chat.gen)
    except EngineBusy as e:
        raise ApiError(503, str(e), "server_busy", headers={"Retry-After": str(BUSY_RETRY_AFTER_S)}) from None
    except MedVLMError as e:
        raise ApiError(400, str(e)) from None
    deltas = reply.astream()
    with _generation_errors():  # wait for the first piece, so input errors still get a proper status
        first = await _unless_disconnected(request, anext(deltas, None))
    if chat.stream:
        return StreamingResponse(_sse(reply, deltas, first, meta, chat.include_usage),
                                 media_type="text/event-stream",
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


async def _sse(reply: Reply, deltas: AsyncIterator[str], first: str | None, meta: dict,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent chunks; with `include_usage` the usage follows as its own chunk with no choices."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}])

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        if first:
            yield chunk({"content": first})
        async for piece in deltas:
            yield chunk({"content": piece})
        yield chunk({}, _finish(reply))
        if include_usage:
            yield event([], usage=_usage(reply))
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
