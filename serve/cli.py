"""`medvlm serve`: one process, one uvicorn server, one loaded model behind the Gradio UI (at /)
and the OpenAI-compatible API (at /v1). Binds 127.0.0.1 and makes no public link unless asked."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
from pathlib import Path

from vlm.errors import ConfigError

DEFAULT_PORT = 7860
AUTH_ENV = "MEDVLM_AUTH"
_WILDCARDS = ("0.0.0.0", "::", "")


def add_commands(sub) -> None:
    from vlm.options import add_model_options

    p = sub.add_parser("serve", help="serve the chat UI and an OpenAI-compatible API",
                       description="Serve the Gradio chat UI at / and the OpenAI-compatible API at /v1 "
                                   "(POST /v1/chat/completions, GET /v1/models, GET /health) from one process.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument("--auth", metavar="USER:PASS", default=None,
                   help="require this login for the UI, and HTTP Basic or 'Authorization: Bearer USER:PASS' "
                        "for the API. A password on the command line is visible to other users of this machine "
                        f"(ps): prefer --auth-file or the {AUTH_ENV} environment variable")
    p.add_argument("--auth-file", metavar="PATH", default=None,
                   help="read the login (one line USER:PASS) from this file instead")
    p.add_argument("--allowed-hosts", metavar="NAME[:PORT],...", default=None,
                   help="Host header names served besides 127.0.0.1, localhost and [::1] on --port and --host "
                        "(comma-separated; NAME alone allows any port; * allows any host). Others get 400 "
                        "'Host not allowed' (a guard against DNS rebinding)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generations run at once (default: 1; a conversation's cache is not shared between decodes)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait beyond the running ones; more get 'busy, try again' (HTTP 503)")
    p.add_argument("--max-image-mb", type=float, default=64.0, help="largest accepted image upload in MB (default: 64)")
    p.add_argument("--max-cache-mb", type=float, default=2048.0,
                   help="memory for the conversations' KV caches, in MB; beyond it the least recently used "
                        "are dropped (they then recompute their prefix) (default: 2048)")
    p.add_argument("--share", action="store_true",
                   help="also open a temporary public Gradio share link (off by default: images may be patient data)")
    add_model_options(p)
    p.set_defaults(run=run_serve)


def parse_auth(text: str | None, where: str = "--auth") -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise ConfigError(f"{where} must be USER:PASS, both non-empty.")
    return user, password


def resolve_auth(args: argparse.Namespace, environ=os.environ) -> tuple[str, str] | None:
    """The login from --auth, else --auth-file (its first line), else $MEDVLM_AUTH; None for none."""
    auth_file = getattr(args, "auth_file", None)
    if args.auth is not None and auth_file is not None:
        raise ConfigError("give either --auth or --auth-file, not both.")
    if auth_file is not None:
        try:
            lines = Path(auth_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"--auth-file {auth_file}: cannot read it ({reason}).") from None
        return parse_auth(lines[0] if lines else "", f"the first line of --auth-file {auth_file}")
    if args.auth is not None:
        return parse_auth(args.auth)
    return parse_auth(environ.get(AUTH_ENV) or None, AUTH_ENV)


def allowed_hosts(host: str, port: int, extra: str | None = None) -> list[str]:
    """The Host header values the server answers: the loopback names and --host on --port, and --allowed-hosts."""
    from serve.web_guard import LOOPBACK_NAMES, host_entry

    hosts = [host_entry(name, port) for name in LOOPBACK_NAMES]
    if host not in _WILDCARDS:
        hosts.append(host_entry(host, port))
    for entry in filter(None, (e.strip() for e in (extra or "").split(","))):
        if not _host_entry_ok(entry):
            raise ConfigError(f"--allowed-hosts: {entry!r} is not NAME, NAME:PORT or *.")
        hosts.append(entry)
    return hosts


def _host_entry_ok(entry: str) -> bool:
    if entry == "*" or (entry.count(":") > 1 and not entry.startswith("[")):  # any, or a bare IPv6 address
        return True
    name, sep, port = entry.rpartition(":") if not entry.endswith("]") else (entry, "", "")
    return not sep or (bool(name) and port.isdigit() and 0 < int(port) < 65536)


def check_options(args: argparse.Namespace) -> None:
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: give a port between 1 and 65535.")
    if args.concurrency < 1 or args.queue_size < 0:
        raise ConfigError("--concurrency must be at least 1 and --queue-size at least 0.")
    if args.max_image_mb <= 0:
        raise ConfigError("--max-image-mb must be positive.")
    if args.max_cache_mb < 0:
        raise ConfigError("--max-cache-mb must be 0 or more.")


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); "
                              "choose another --port or --host.") from None


def build_server(args: argparse.Namespace):
    """Check the options, load the model and return (uvicorn server, engine, local URL), not yet running."""
    import uvicorn

    from serve.app import build_app
    from serve.engine import Engine
    from vlm.options import load_assistant_from_args

    check_options(args)
    auth = resolve_auth(args)
    hosts = allowed_hosts(args.host, args.port, getattr(args, "allowed_hosts", None))
    check_port_free(args.host, args.port)  # before the (slow) model load
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"medvlm: warning: serving on {args.host} without --auth: anyone who can reach this "
              "machine can use it.", file=sys.stderr)
    if args.host in _WILDCARDS and not getattr(args, "allowed_hosts", None):
        print("medvlm: note: only requests addressed to 127.0.0.1, localhost or [::1] are answered; give "
              "--allowed-hosts NAME for the name or address other machines use.", file=sys.stderr)
    print(f"medvlm: loading model {args.model} ...", file=sys.stderr, flush=True)
    assistant = load_assistant_from_args(args, concurrency=args.concurrency)
    engine = Engine(assistant, concurrency=args.concurrency, queue_size=args.queue_size,
                    max_image_bytes=int(args.max_image_mb * 2**20),
                    max_cache_bytes=int(args.max_cache_mb * 2**20), name=assistant.name)
    app = build_app(engine, auth=auth, allowed_hosts=hosts)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    url = f"http://{shown}:{args.port}/"
    # log_config=None: uvicorn's loggers propagate to the redacting root handler (serve/logs.py).
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", log_config=None))
    return server, engine, url


def run_serve(args: argparse.Namespace) -> int:
    from serve.logs import configure_logging

    configure_logging(logging.INFO)
    server, engine, url = build_server(args)
    if args.share:
        _share_when_started(server, args.port)
    print(f"medvlm: serving {engine.name} at {url} (UI) and {url}v1 (API); Ctrl+C stops", flush=True)
    try:
        server.run()
    finally:
        engine.close()
    return 0


def _share_when_started(server, port: int) -> None:
    """Open a Gradio share tunnel to the local port once uvicorn listens (only with --share)."""
    import threading
    import time

    def tunnel():
        from gradio import networking

        while not server.started and not server.should_exit:
            time.sleep(0.1)
        try:
            link = networking.setup_tunnel("127.0.0.1", port, secrets.token_urlsafe(32), None, None)
            print(f"medvlm: public share link (anyone with it can use this server): "
                  f"{link.replace('http://', 'https://', 1)}", flush=True)
        except Exception as e:  # offline, blocked, or the share server is down
            print(f"medvlm: warning: no share link ({type(e).__name__}: {e}); serving locally only.",
                  file=sys.stderr, flush=True)

    threading.Thread(target=tunnel, name="medvlm-share", daemon=True).start()
