"""The serving engine on its own: a full queue, cancellation, report drafts, authentication and
the `medvlm serve` command line. Generation is faked where only the queue is under test."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from PIL import Image

from serve.engine import Engine, EngineBusy, split_report
from tests.serve_fixtures import TIMEOUT, free_port, local_server, png_bytes, running, wait_until
from vlm.generation import GenerationConfig


class SlowStream:
    """A fake generation: one token per `delay` seconds, or none until `gate` opens."""

    prompt_tokens = cached_tokens = 0  # what TextStream reports; a fake has no prompt
    finish_reason = "length"  # it always runs to its budget

    def __init__(self, n: int, delay: float = 0.0, gate: threading.Event | None = None):
        self.n, self.delay, self.gate, self.num_tokens = n, delay, gate, 0

    def __iter__(self):
        for _ in range(self.n):
            if self.gate is not None:
                self.gate.wait(TIMEOUT)
            time.sleep(self.delay)
            self.num_tokens += 1
            yield "x"


class SlowEngine(Engine):
    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.gate = threading.Event()
        self.delay = 0.0
        self.streams: list[SlowStream] = []

    def _stream(self, conversation, messages, images, gen, cancelled=None):
        stream = SlowStream(gen.max_new_tokens, self.delay, self.gate if not self.delay else None)
        self.streams.append(stream)
        return stream


def test_a_full_queue_answers_busy_then_recovers(taught_model):
    from fastapi.testclient import TestClient

    from serve.api import create_api

    engine = SlowEngine(taught_model, concurrency=1, queue_size=1)
    hello = [{"role": "user", "content": "hi"}]
    running = engine.chat("a", hello, [], GenerationConfig(max_new_tokens=2))
    waiting = engine.chat("b", hello, [], GenerationConfig(max_new_tokens=2))
    with pytest.raises(EngineBusy, match="busy"):
        engine.chat("c", hello, [], GenerationConfig(max_new_tokens=2))
    with TestClient(create_api(engine), base_url="http://127.0.0.1") as api:
        r = api.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "server_busy" and "try again" in r.json()["error"]["message"]
        waiting.cancel()  # given up while queued: it never starts
        engine.gate.set()
        assert running.text() == "xx" and running.finish_reason == "length"
        assert waiting.text() == "" and waiting.finish_reason == "cancelled" and len(engine.streams) == 1
        assert wait_until(lambda: engine.pending == 0)
        r = api.post("/v1/chat/completions", json={"messages": hello, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "xxx"
    engine.close()


def test_leaving_a_reply_early_stops_its_generation(taught_model):
    engine = SlowEngine(taught_model)
    engine.delay = 0.01
    reply = engine.chat("a", [{"role": "user", "content": "hi"}], [], GenerationConfig(max_new_tokens=2000))
    for i, _ in enumerate(reply):
        if i == 2:
            break  # the reader leaves (closes the iterator)
    assert wait_until(lambda: engine.pending == 0), "the worker stopped"
    assert reply.finish_reason == "cancelled" and engine.streams[0].num_tokens < 500
    engine.close()


def test_a_client_that_disconnects_stops_the_generation(taught_model):
    from serve.api import create_api

    engine = SlowEngine(taught_model)
    engine.delay = 0.01  # 2000 tokens would take 20 s
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    with running(local_server(create_api(engine))) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=TIMEOUT) as r:
            assert next(r.iter_lines()).startswith("data: ")  # then the client goes away
        assert wait_until(lambda: engine.pending == 0), "the streamed generation stopped"
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up after 1 s
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1)
        assert wait_until(lambda: engine.pending == 0), "the plain generation stopped"
    assert [s.num_tokens < 500 for s in engine.streams] == [True, True]
    engine.close()


@pytest.mark.parametrize("text, findings, impression", [
    ("Findings: Clear lungs.\nImpression: Normal.", "Clear lungs.", "Normal."),
    ("FINDINGS:\nNo effusion.\n\nIMPRESSION:\nNo acute disease.", "No effusion.", "No acute disease."),
    ("## Findings\nHeart normal.\n## Impression\nNormal chest.", "Heart normal.", "Normal chest."),
    ("The lungs are clear. No pneumothorax.", "The lungs are clear. No pneumothorax.", ""),
])
def test_report_drafts_are_split_at_the_impression(text, findings, impression):
    assert split_report(text) == {"findings": findings, "impression": impression}


def test_draft_report_uses_the_report_prompt(taught_model):
    engine = Engine(taught_model)
    image = Image.open(io.BytesIO(png_bytes(6, size=80)))
    assert engine.draft_report(image, GenerationConfig(max_new_tokens=40)) == {
        "study": "radiograph of the chest (from the model's answers)",
        "findings": "No pleural effusion.", "impression": "No acute disease."}
    engine.close()


# ---- authentication and the command line -------------------------------------------------------

def test_auth_protects_the_api_and_the_ui(taught_model):
    from fastapi.testclient import TestClient

    from serve.app import build_app

    engine = Engine(taught_model)
    with TestClient(build_app(engine, auth=("doc", "s3cret")), base_url="http://127.0.0.1") as app:
        refused = app.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert app.get("/v1/models", auth=("doc", "wrong")).status_code == 401
        assert app.get("/v1/models", auth=("doc", "s3cret")).status_code == 200
        assert app.get("/v1/models", headers={"Authorization": "Bearer doc:s3cret"}).status_code == 200
        assert app.get("/config").status_code == 401, "the UI's config needs a login"
        assert app.post("/login", data={"username": "doc", "password": "s3cret"}).status_code == 200
        assert app.get("/config").status_code == 200
    engine.close()


@pytest.fixture
def restored_logging():
    """`medvlm serve` configures the process's logging (serve/logs.py); put it back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level, raising = list(root.handlers), root.level, logging.raiseExceptions
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.raiseExceptions = raising


def test_serve_command_options_and_errors(capsys, restored_logging):
    from vlm.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.share, args.model, args.concurrency) == ("127.0.0.1", 7860, False, "demo", 1)
    port = str(free_port())
    assert main(["serve", "--model", "/no/such/checkpoint", "--port", port]) == 2
    assert main(["serve", "--auth", "nopassword", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "--auth must be USER:PASS" in err and "Traceback" not in err
