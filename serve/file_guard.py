"""Uploaded and generated files are served only to the browser that they belong to.

Gradio serves every file in its cache at `/gradio_api/file=PATH` to anyone who has the URL.
Here each browser (and each gradio_client, which keeps the cookies of its first response) gets
a random, HttpOnly, SameSite=Strict cookie; a file uploaded with that cookie, or made for it (a
preview, a report draft), is registered to it, and a request for a registered file without the
cookie it is registered to gets a 404, as if there were no such file. Files that belong to
nobody (the bundled example images) are served as Gradio serves them.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import OrderedDict
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import unquote

COOKIE = "medvlm_files"
MAX_CLIENTS = 10_000
_UPLOAD_BODY_LIMIT = 2**20  # a JSON list of saved paths; anything larger is not Gradio's answer


class FileOwners:
    """Which client cookie each private file belongs to (bounded: the oldest clients are forgotten,
    and their files then belong to nobody who can still ask for them)."""

    def __init__(self, max_clients: int = MAX_CLIENTS):
        self.max_clients = max_clients
        self._files: OrderedDict[str, set[str]] = OrderedDict()  # token -> paths
        self._owners: dict[str, set[str]] = {}  # path -> tokens
        self._lock = threading.Lock()

    def add(self, token: str | None, path: str | Path) -> None:
        if not token:
            return
        path = str(Path(path).resolve())
        with self._lock:
            self._files.setdefault(token, set()).add(path)
            self._files.move_to_end(token)
            self._owners.setdefault(path, set()).add(token)
            while len(self._files) > self.max_clients:
                old, paths = self._files.popitem(last=False)
                for p in paths:
                    self._drop(p, old)

    def may_read(self, token: str | None, path: str | Path) -> bool:
        """False only for a private file that `token` does not own."""
        owners = self._owners.get(str(Path(path).resolve()))
        return owners is None or (token is not None and token in owners)

    def remove(self, paths) -> None:
        """Forget deleted files."""
        with self._lock:
            for path in paths:
                path = str(Path(path).resolve())
                for token in self._owners.pop(path, set()):
                    self._files.get(token, set()).discard(path)

    def _drop(self, path: str, token: str) -> None:
        tokens = self._owners.get(path)
        if tokens is not None:
            tokens.discard(token)
            if not tokens:  # still private: a forgotten owner's file is nobody's to read
                tokens.add("")


def request_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header: no token
                return None
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


class FileGuard:
    """ASGI middleware: hands out the client cookie, registers uploads, guards file downloads."""

    def __init__(self, app, owners: FileOwners):
        self.app, self.owners = app, owners

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith(("/v1", "/health")):
            return await self.app(scope, receive, send)
        token = request_token(scope.get("headers", []))
        path = scope["path"]
        if "/file=" in path and not self.owners.may_read(token, unquote(path.split("/file=", 1)[1])):
            return await _not_found(send)
        new_token = None if token else secrets.token_urlsafe(24)
        is_upload = scope["method"] == "POST" and path.endswith("/upload")
        body: list[bytes] = []

        async def sending(message):
            if message["type"] == "http.response.start" and new_token:
                cookie = f"{COOKIE}={new_token}; Path=/; HttpOnly; SameSite=Strict"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            elif message["type"] == "http.response.body" and is_upload:
                if sum(map(len, body)) < _UPLOAD_BODY_LIMIT:
                    body.append(message.get("body", b""))
                if not message.get("more_body"):
                    self._register_upload(token or new_token, b"".join(body))
            await send(message)

        await self.app(scope, receive, sending)

    def _register_upload(self, token: str, body: bytes) -> None:
        try:
            paths = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        if isinstance(paths, list):
            for path in paths:
                if isinstance(path, str):
                    self.owners.add(token, path)


async def _not_found(send) -> None:
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"detail":"Not Found"}'})
