"""ASGI middleware for a server that browsers can reach, around the API and the UI alike.

- `HostGuard`: the Host header must name this server (DNS rebinding: a page on evil.example whose
  name is re-pointed at 127.0.0.1 would otherwise be same-origin with it). By default the
  loopback names 127.0.0.1, localhost and [::1] on any port; `medvlm serve` narrows that to its
  own port plus its --host and widens it with --allowed-hosts (`*` allows any). Refused: 400.
- `JsonOnly`: a POST to the API (/v1/chat/completions) must say `Content-Type: application/json`
  (415 otherwise). A form or text/plain POST is what a foreign page can send without a CORS
  preflight.
- CORS: no cross-origin reads at all. Starlette's `CORSMiddleware` with no allowed origins on
  the parent app also turns off Gradio's own, which would echo any origin with credentials when
  the server is reached by a non-loopback name, and any loopback origin (another port) otherwise.
  Same-origin pages (the UI itself) need no CORS headers.
- `AuthThrottle` (with --auth): a client address with `limit` failed logins (API 401s that
  carried credentials, failed Gradio /login POSTs) within `window` seconds gets 429 with
  Retry-After on the API and the login route until the oldest of them leaves the window. A
  success resets nothing; the table holds at most `max_clients` addresses (least recently seen
  dropped). Behind a reverse proxy every client shares the proxy's address.

Nothing here logs a request's content: refusals log the path only.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict, deque

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.openai_schema import error_response

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
LOGIN_PATHS = ("/login", "/login/")
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def loggable_path(path: str) -> str:
    """An API path as is (truncated); a UI path hidden, since it can name an uploaded file."""
    return path[:100] if path.startswith("/v1/") or path == "/health" else "(a UI path)"


def split_host(value: str) -> tuple[str, int | None]:
    """'name:port' -> ('name', port); '[::1]:80' -> ('[::1]', 80); no (or a bad) port -> None."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name, port = name + "]", rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port = value.partition(":")
    else:
        name, port = value, ""
    return name, int(port) if port.isdigit() and len(port) <= 5 else None


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str, kind: str,
                 **kwargs) -> None:
    """Answer the request with an OpenAI-style error (serve.openai_schema.error_response)."""
    await error_response(status, message, kind, **kwargs)(scope, receive, send)


def host_entry(host: str, port: int | None = None) -> str:
    """A bind address as a Host header names it ('::1' -> '[::1]'), with its port if given."""
    name = f"[{host}]" if host.count(":") > 1 and not host.startswith("[") else host
    return f"{name}:{port}" if port is not None else name


class HostGuard:
    """Refuse requests whose Host header is not in `allowed` (entries 'name' for any port,
    'name:port' for one, '*' for any host; None: the loopback names on any port)."""

    def __init__(self, app: ASGIApp, allowed: list[str] | None = None):
        self.app = app
        entries = list(LOOPBACK_NAMES if allowed is None else allowed)
        self.any_host = "*" in entries
        self.allowed = {split_host(host_entry(e) if e.count(":") > 1 else e) for e in entries if e != "*"}

    def allows(self, host: str | None, scheme: str) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        name, port = split_host(host)
        port = port if port is not None else _DEFAULT_PORTS.get(scheme)
        return (name, None) in self.allowed or (name, port) in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.allows(Headers(scope=scope).get("host"),
                                                                      scope.get("scheme", "http")):
            log.warning("refused a request to %s: Host not allowed", loggable_path(scope.get("path", "")))
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await refuse(scope, receive, send, 400, "Host not allowed. To serve under this name, start the "
                         "server with --allowed-hosts NAME.", "invalid_request_error", code="host_not_allowed")
            return
        await self.app(scope, receive, send)


class JsonOnly:
    """POST to one of `paths` (the API's POST routes): Content-Type must be application/json
    (415 otherwise). Other paths are left to the router (404, or 405 for a wrong method)."""

    def __init__(self, app: ASGIApp, paths: tuple[str, ...]):
        self.app, self.paths = app, {p.rstrip("/") for p in paths}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in self.paths:
            media = Headers(scope=scope).get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                await refuse(scope, receive, send, 415, "The request body must be JSON, sent with "
                             "'Content-Type: application/json'.", "invalid_request_error",
                             code="unsupported_media_type")
                return
        await self.app(scope, receive, send)


class AuthThrottle:
    """429 after `limit` failed logins from one address within `window` seconds (see the module docstring)."""

    def __init__(self, app: ASGIApp, limit: int = 5, window: float = 60.0, max_clients: int = 4096,
                 clock=time.monotonic):
        self.app, self.limit, self.window, self.max_clients, self.clock = app, limit, window, max_clients, clock
        self.failures: OrderedDict[str, deque] = OrderedDict()

    @staticmethod
    def _guarded(scope: Scope) -> bool:
        return scope["path"].startswith("/v1/") or (scope["method"] == "POST" and scope["path"] in LOGIN_PATHS)

    @staticmethod
    def _failed(scope: Scope, status: int) -> bool:
        if scope["path"] in LOGIN_PATHS:
            return status in (400, 401)
        return status == 401 and "authorization" in Headers(scope=scope)  # a wrong guess, not a bare request

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again (0: now)."""
        times = self.failures.get(address)
        if times is None or len(times) < self.limit:
            return 0
        return max(0, math.ceil(times[0] + self.window - self.clock()))

    def record_failure(self, address: str) -> None:
        times = self.failures.pop(address, None) or deque(maxlen=self.limit)
        times.append(self.clock())
        self.failures[address] = times  # most recently seen last
        while len(self.failures) > self.max_clients:
            self.failures.popitem(last=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(scope):
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown",))[0]
        wait = self.retry_after(address)
        if wait:
            log.warning("refused a login attempt on %s: too many failures", loggable_path(scope["path"]))
            await refuse(scope, receive, send, 429, "Too many failed logins from this address; "
                         f"try again in {wait} s.", "rate_limit_error", code="too_many_failed_logins",
                         headers={"Retry-After": str(wait)})
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and self._failed(scope, message["status"]):
                self.record_failure(address)
            await send(message)

        await self.app(scope, receive, watch)


def install(app, allowed_hosts: list[str] | None, throttle_logins: bool, json_paths: tuple[str, ...]) -> None:
    """Add the guards to a Starlette/FastAPI app (the last added runs first: the Host check)."""
    app.add_middleware(JsonOnly, paths=json_paths)
    app.add_middleware(CORSMiddleware, allow_origins=())
    if throttle_logins:
        app.add_middleware(AuthThrottle)
    app.add_middleware(HostGuard, allowed=allowed_hosts)
