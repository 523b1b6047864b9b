"""`medvlm serve`: the engine, the OpenAI-compatible API and the Gradio UI on one real server.

The model is the tiny offline one, taught in a few seconds to answer "The lungs are clear." and
to draft a sectioned report, so replies are stable and readable. The server runs in a thread on
127.0.0.1; every request is local and bounded by a timeout.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve.engine import Engine, EngineBusy, split_report
from vlm.generation import GenerationConfig
from vlm.prompts import REPORT_PROMPT

ANSWER = "The lungs are clear."
REPORT = "Findings: No pleural effusion.\nImpression: No acute disease."
TIMEOUT = 60
# Gradio's queue statistics use pandas APIs that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


# ---- fixtures ----------------------------------------------------------------------------------

def build_taught_checkpoint(tiny_config, folder: Path) -> Path:
    """A tiny model taught two fixed replies (the untrained one only babbles whitespace), saved
    as a checkpoint with its own LLM folder. Built once per session: later calls reuse it."""
    from vlm.checkpoint import save_checkpoint
    from vlm.model import MedVLM

    checkpoint = folder / "checkpoint"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    torch.manual_seed(0)
    model = MedVLM.build(tiny_config)
    rng = np.random.default_rng(0)
    conversations = [
        [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": ANSWER}],
        [{"role": "user", "content": "<image>\nIs the heart enlarged?"}, {"role": "assistant", "content": ANSWER},
         {"role": "user", "content": "And the pleura?"}, {"role": "assistant", "content": ANSWER}],
        [{"role": "user", "content": REPORT_PROMPT}, {"role": "assistant", "content": REPORT}],
    ]
    encoded = [model.prompts.encode(c) for c in conversations]
    model.llm.requires_grad_(True)
    optimizer = torch.optim.Adam(model.llm.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        for e in encoded:
            image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            model(torch.tensor([e.input_ids]), pixel_values=model.preprocess([image]),
                  labels=torch.tensor([e.labels])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    llm_dir = folder / "llm"
    model.llm.save_pretrained(llm_dir)
    model.tokenizer.save_pretrained(llm_dir)
    model.config = model.config.replace(language={"source": str(llm_dir)})
    return save_checkpoint(model, checkpoint)


@pytest.fixture(scope="session")
def taught_checkpoint(tiny_config, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_taught_checkpoint(tiny_config, tmp_path_factory.getbasetemp() / "taught-model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_server(app):
    """A uvicorn server for `app` on 127.0.0.1 and a free port (its address in `.url`)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.url = f"http://127.0.0.1:{port}"
    return server


@contextlib.contextmanager
def running(server):
    """Run a uvicorn server in a daemon thread for the duration of the block."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), TIMEOUT)
        assert server.started, "the server did not start"
        yield server
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def model(taught_checkpoint):
    from vlm.model import MedVLM

    torch.set_num_threads(1)
    return MedVLM.from_pretrained(str(taught_checkpoint))


@pytest.fixture(scope="module")
def served(model):
    """The real app (API + UI) on one engine; `vision_calls` counts vision-tower forwards."""
    from serve.app import build_app

    engine = Engine(model, queue_size=4, max_image_bytes=2**20, name="tiny")
    calls = []
    hook = model.vision.register_forward_hook(lambda *_: calls.append(1))
    with running(local_server(build_app(engine, max_body_bytes=2 * 2**20))) as server:
        server.engine, server.vision_calls = engine, calls
        yield server
    hook.remove()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url + "/", verbose=False, download_files=False)


def png_bytes(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG header claiming a huge image (no pixel data to speak of)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm", download=False))


def fetched(output: dict) -> bytes:
    """The content of a file a Gradio endpoint returned (gradio_client gives its URL), or of the
    file in a component update."""
    if output.get("__type__") == "update":
        output = output["value"]
    return httpx.get(output["url"], timeout=TIMEOUT).content


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts}


def post(served, body, **kwargs) -> httpx.Response:
    return httpx.post(served.url + "/v1/chat/completions", json=body, timeout=TIMEOUT, **kwargs)


BAD_UPLOADS = {  # name -> (bytes, the start of what the user is told)
    "empty.png": (lambda: b"", "The file is empty"),
    "cut.dcm": (lambda: ct_small().read_bytes()[:20000], "The DICOM file is truncated"),
    "notes.txt": (lambda: b"Patient doing well, discharge tomorrow.\n", "This file is not a PNG, JPEG or DICOM"),
    "huge.png": (bomb_png, "The image is 30000x30000 pixels; the limit is"),
}


# ---- the HTTP API ------------------------------------------------------------------------------

def test_api_answers_plain_and_streamed_in_the_openai_schema(served):
    body = {"model": "tiny", "messages": [image_message("What is this?", data_url(png_bytes(1)))], "max_tokens": 16}
    r = post(served, body)
    assert r.status_code == 200, r.text
    plain = r.json()
    assert plain["id"].startswith("chatcmpl-") and plain["object"] == "chat.completion" and plain["model"] == "tiny"
    choice = plain["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER} and choice["finish_reason"] == "stop"
    usage = plain["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWER
    assert len(chunks) > 3, "the reply arrives token by token"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] > 0


def test_api_lists_models_and_health(served):
    assert httpx.get(served.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    models = httpx.get(served.url + "/v1/models", timeout=TIMEOUT).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_follow_up_turn_reuses_the_cached_image_prefix(served):
    url = data_url(png_bytes(2))
    first = [image_message("Is the heart enlarged?", url)]
    before = len(served.vision_calls)
    r1 = post(served, {"messages": first, "max_tokens": 16}).json()
    assert len(served.vision_calls) == before + 1
    follow = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And the pleura?"}]
    r2 = post(served, {"messages": follow, "max_tokens": 16}).json()
    assert r2["choices"][0]["message"]["content"] == ANSWER
    cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= r1["usage"]["prompt_tokens"], "the whole first turn, image included, is reused"
    assert len(served.vision_calls) == before + 1, "the image is not encoded again"


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_api_refuses_bad_images_with_the_reason_and_keeps_serving(served, name):
    data, message = BAD_UPLOADS[name]
    mime = "application/dicom" if name.endswith(".dcm") else "image/png"
    r = post(served, {"messages": [image_message("What is this?", data_url(data(), mime))], "max_tokens": 4})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert "Traceback" not in r.text
    good = post(served, {"messages": [image_message("What is this?", data_url(png_bytes(3)))], "max_tokens": 8})
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("url", ["https://example.org/x.png", "file:///etc/passwd", "/etc/hostname",
                                 "data:image/png,notbase64", "data:text/plain;base64,aGk="])
def test_api_accepts_only_inline_data_images(served, url):
    r = post(served, {"messages": [image_message("What is this?", url)]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role must be system, user or assistant"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n=1"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "'max_tokens' must be an integer"),
])
def test_api_explains_malformed_requests(served, body, fragment):
    r = post(served, body)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_api_limits_the_request_size(served):
    big = {"messages": [{"role": "user", "content": "x" * (3 * 2**20)}]}
    r = post(served, big)
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]
    # No Content-Length (chunked): counted while reading.
    chunks = (b"x" * 2**20 for _ in range(3))
    r = httpx.post(served.url + "/v1/chat/completions", content=chunks, timeout=TIMEOUT)
    assert r.status_code == 413
    r = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "The request body is not valid JSON."
    assert httpx.get(served.url + "/v1/nothing", timeout=TIMEOUT).json()["error"]["type"] == "not_found_error"


# ---- the Gradio UI, driven by gradio_client ----------------------------------------------------

def test_ui_chats_about_a_png_and_a_dicom_and_drafts_a_report(served, client, tmp_path):
    from gradio_client import handle_file

    png = tmp_path / "chest.png"
    png.write_bytes(png_bytes(4))
    preview, info, _, history, *_ = client.predict(handle_file(png), "auto/file", api_name="/upload")
    assert Image.open(io.BytesIO(fetched(preview))).size == (48, 48)
    assert info.startswith("PNG, 48x48") and history == []
    history, box = client.predict("What is this?", [], handle_file(png), "auto/file", 0, 32, 0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] and box == ""
    assert history[-1]["content"][0]["text"] == ANSWER

    dicom = handle_file(ct_small())
    preview, info, frame, history, *_ = client.predict(dicom, "lung", api_name="/upload")
    assert info.startswith("DICOM CT, 128x128") and "window lung" in info and history == []
    _, info = client.predict(dicom, "bone", 0, api_name="/render")
    assert "window bone" in info
    calls = len(served.vision_calls)
    history, _ = client.predict("Is the heart enlarged?", [], dicom, "bone", 0, 32, 0, api_name="/chat")
    history, _ = client.predict("And the pleura?", history, dicom, "bone", 0, 32, 0, api_name="/chat")
    assert [m["content"][0]["text"] for m in history[1::2]] == [ANSWER, ANSWER]
    assert len(served.vision_calls) == calls + 1, "the follow-up reuses the encoded image"

    findings, impression = client.predict(dicom, "bone", 0, 64, api_name="/draft_report")
    assert (findings, impression) == ("No pleural effusion.", "No acute disease.")
    text = fetched(client.predict("Edited findings.", impression, api_name="/export_report")).decode()
    assert "## Findings\n\nEdited findings." in text and "## Impression\n\nNo acute disease." in text
    assert "not a medical device" in text


@pytest.mark.parametrize("name", list(BAD_UPLOADS))
def test_ui_shows_why_an_upload_is_refused_and_keeps_working(served, client, tmp_path, name):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    data, message = BAD_UPLOADS[name]
    bad = tmp_path / name
    bad.write_bytes(data())
    with pytest.raises(AppError) as refused:
        client.predict(handle_file(bad), "auto/file", api_name="/upload")
    assert str(refused.value).startswith(message)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(5))
    assert client.predict(handle_file(good), "auto/file", api_name="/upload")[1].startswith("PNG")


def test_ui_shows_the_frames_of_a_multiframe_dicom(served, client):
    from gradio_client import handle_file
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm", download=False)  # from pydicom-data (dev extra)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    _, info, frame, *_ = client.predict(handle_file(path), "auto/file", api_name="/upload")
    assert frame["visible"] and (frame["maximum"], frame["value"]) == (9, 5) and "frame 6 of 10" in info
    _, info = client.predict(handle_file(path), "brain", 2, api_name="/render")
    assert "frame 3 of 10" in info and "window brain" in info


def test_ui_decodes_the_upload_again_when_the_engine_dropped_it(served, client, tmp_path):
    from gradio_client import handle_file

    png = tmp_path / "again.png"
    png.write_bytes(png_bytes(7))
    client.predict(handle_file(png), "auto/file", api_name="/upload")
    conversation = f"ui-{client.session_hash}"
    served.engine.forget(conversation)  # as the LRU does when many others are chatting
    history, _ = client.predict("What is this?", [], handle_file(png), "auto/file", 0, 32, 0, api_name="/chat")
    assert history[-1]["content"][0]["text"] == ANSWER and len(served.engine.images(conversation)) == 1


def test_ui_draft_without_an_image_says_so(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    fresh = Client(served.url + "/", verbose=False, download_files=False)
    with pytest.raises(AppError, match="Upload an image first"):
        fresh.predict(None, "auto/file", 0, 64, api_name="/draft_report")


# ---- the engine: queue, cancellation, reports --------------------------------------------------

class SlowStream:
    """A fake generation: one token per `delay` seconds, or none until `gate` opens."""

    prompt_tokens = cached_tokens = 0  # what TextStream reports; a fake has no prompt

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

    def _stream(self, conversation, messages, images, gen):
        stream = SlowStream(gen.max_new_tokens, self.delay, self.gate if not self.delay else None)
        self.streams.append(stream)
        return stream


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_full_queue_answers_busy_then_recovers(model):
    from fastapi.testclient import TestClient

    from serve.api import create_api

    engine = SlowEngine(model, concurrency=1, queue_size=1)
    hello = [{"role": "user", "content": "hi"}]
    running = engine.chat("a", hello, [], GenerationConfig(max_new_tokens=2))
    waiting = engine.chat("b", hello, [], GenerationConfig(max_new_tokens=2))
    with pytest.raises(EngineBusy, match="busy"):
        engine.chat("c", hello, [], GenerationConfig(max_new_tokens=2))
    with TestClient(create_api(engine)) as api:
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


def test_leaving_a_reply_early_stops_its_generation(model):
    engine = SlowEngine(model)
    engine.delay = 0.01
    reply = engine.chat("a", [{"role": "user", "content": "hi"}], [], GenerationConfig(max_new_tokens=2000))
    for i, _ in enumerate(reply):
        if i == 2:
            break  # the reader leaves (closes the iterator)
    assert wait_until(lambda: engine.pending == 0), "the worker stopped"
    assert reply.finish_reason == "cancelled" and engine.streams[0].num_tokens < 500
    engine.close()


def test_a_client_that_disconnects_stops_the_generation(model):
    from serve.api import create_api

    engine = SlowEngine(model)
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


def test_draft_report_uses_the_report_prompt(model):
    engine = Engine(model)
    image = Image.open(io.BytesIO(png_bytes(6)))
    assert engine.draft_report(image, GenerationConfig(max_new_tokens=40)) == {
        "findings": "No pleural effusion.", "impression": "No acute disease."}
    engine.close()


# ---- authentication and the command line -------------------------------------------------------

def test_auth_protects_the_api_and_the_ui(model):
    from fastapi.testclient import TestClient

    from serve.app import build_app

    engine = Engine(model)
    with TestClient(build_app(engine, auth=("doc", "s3cret"))) as app:
        refused = app.get("/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert app.get("/v1/models", auth=("doc", "wrong")).status_code == 401
        assert app.get("/v1/models", auth=("doc", "s3cret")).status_code == 200
        assert app.get("/v1/models", headers={"Authorization": "Bearer doc:s3cret"}).status_code == 200
        assert app.get("/config").status_code == 401, "the UI's config needs a login"
        assert app.post("/login", data={"username": "doc", "password": "s3cret"}).status_code == 200
        assert app.get("/config").status_code == 200
    engine.close()


def test_serve_command_options_and_errors(capsys):
    from vlm.cli import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.share, args.model, args.concurrency) == ("127.0.0.1", 7860, False, "demo", 1)
    port = str(free_port())
    assert main(["serve", "--model", "/no/such/checkpoint", "--port", port]) == 2
    assert main(["serve", "--auth", "nopassword", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "--auth must be USER:PASS" in err and "Traceback" not in err
