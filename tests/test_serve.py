"""`medvlm serve`: the engine, the OpenAI-compatible API and the Gradio UI on one real server.

The model is the tiny offline one, taught in a few seconds to answer "The lungs are clear." and
to draft a sectioned report (tests/serve_fixtures.py), so replies are stable and readable. The
server runs in a thread on 127.0.0.1; every request is local and bounded by a timeout. The
engine's queue, cancellation and the command line are in tests/test_engine.py.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from serve.engine import Engine
from tests.serve_fixtures import (
    ANSWER,
    TIMEOUT,
    bomb_png,
    ct_small,
    data_url,
    image_message,
    local_server,
    png_bytes,
    running,
)

# Gradio's queue statistics use pandas APIs that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(taught_model):
    """The real app (API + UI) on one engine; `vision_calls` counts vision-tower forwards."""
    from serve.app import build_app

    engine = Engine(taught_model, queue_size=4, max_image_bytes=2**20, name="tiny")
    calls = []
    hook = taught_model.vision.register_forward_hook(lambda *_: calls.append(1))
    with running(local_server(build_app(engine, max_body_bytes=2 * 2**20))) as server:
        server.engine, server.vision_calls = engine, calls
        yield server
    hook.remove()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served.url + "/", verbose=False, download_files=False)



def fetched(output: dict, client) -> bytes:
    """The content of a file a Gradio endpoint returned to `client` (gradio_client gives its URL),
    or of the file in a component update; fetched with the client's cookie, which owns the file."""
    if output.get("__type__") == "update":
        output = output["value"]
    r = httpx.get(output["url"], cookies=client.cookies, timeout=TIMEOUT)
    assert r.status_code == 200
    return r.content



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

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=streamed, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    *chunks, usage_chunk = chunks  # asked for: the usage comes last, as a chunk of its own with no choices
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWER
    assert len(chunks) > 3, "the reply arrives token by token"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-1]


def test_api_lists_models_and_health(served):
    assert httpx.get(served.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    models = httpx.get(served.url + "/v1/models", timeout=TIMEOUT).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_follow_up_turn_reuses_the_cached_image_prefix(served):
    url = data_url(png_bytes(2))
    first = [image_message("Is the heart enlarged?", url)]
    before = len(served.vision_calls)
    conversation = "c8a1f0e2-follow-up"  # a client's own conversation: only requests naming it share its cache
    r1 = post(served, {"messages": first, "max_tokens": 16, "conversation_id": conversation}).json()
    assert len(served.vision_calls) == before + 1
    follow = first + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "And the pleura?"}]
    r2 = post(served, {"messages": follow, "max_tokens": 16, "conversation_id": conversation}).json()
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
    json_type = {"Content-Type": "application/json"}
    r = httpx.post(served.url + "/v1/chat/completions", content=chunks, headers=json_type, timeout=TIMEOUT)
    assert r.status_code == 413
    r = httpx.post(served.url + "/v1/chat/completions", content=b"{not json", headers=json_type, timeout=TIMEOUT)
    assert r.status_code == 400 and r.json()["error"]["message"] == "The request body is not valid JSON."
    assert httpx.get(served.url + "/v1/nothing", timeout=TIMEOUT).json()["error"]["type"] == "not_found_error"


# ---- the Gradio UI, driven by gradio_client ----------------------------------------------------

def test_ui_chats_about_a_png_and_a_dicom_and_drafts_a_report(served, client, tmp_path):
    from gradio_client import handle_file

    png = tmp_path / "chest.png"
    png.write_bytes(png_bytes(4))
    preview, info, _, history, *_ = client.predict(handle_file(png), "auto/file", api_name="/upload")
    assert Image.open(io.BytesIO(fetched(preview, client))).size == (48, 48)
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

    # A CT is not what the model reports on: the draft says what the study is, and no findings.
    study, findings, impression = client.predict(dicom, "bone", 0, 64, api_name="/draft_report")
    assert study == "CT of an unidentified region (from the DICOM header)"
    assert "trained to draft reports for frontal chest radiographs only" in findings and "No draft" in impression
    big = tmp_path / "chest-big.png"  # report drafting refuses images under 64 pixels a side
    big.write_bytes(png_bytes(4, size=96))
    client.predict(handle_file(big), "auto/file", api_name="/upload")
    study, findings, impression = client.predict(handle_file(big), "auto/file", 0, 64, api_name="/draft_report")
    assert study == "radiograph of the chest (from the model's answers)"
    assert (findings, impression) == ("No pleural effusion.", "No acute disease.")
    text = fetched(client.predict("Edited findings.", impression, api_name="/export_report"), client).decode()
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


