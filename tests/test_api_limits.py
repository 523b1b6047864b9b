"""Cost control seen from a client: a prompt over the context is a 400 that states the limits, and
a client that disconnects while its long prompt is being prefilled frees the worker for the next."""

from __future__ import annotations

import json
import socket
import threading

import pytest

import vlm.generation as generation
from serve.engine import Engine, Reply
from tests.serve_fixtures import ANSWER, TIMEOUT, data_url, image_message, png_bytes, serving
from vlm.generation import context_length


@pytest.fixture
def server(taught_model):
    from serve.api import create_api

    with serving(Engine(taught_model, name="demo"), create_api) as server:
        yield server


def test_a_prompt_over_the_context_is_a_400_that_states_the_limits(server, taught_model):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    limit = context_length(taught_model)
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model="demo", max_tokens=16,
                                       messages=[{"role": "user", "content": "effusion " * limit}])
    assert f"context of {limit:,} tokens" in refused.value.message and "max_tokens 16" in refused.value.message
    reply = client.chat.completions.create(model="demo", max_tokens=16, messages=[
        image_message("What is this?", data_url(png_bytes(1)))])
    assert reply.choices[0].message.content == ANSWER, "the server goes on serving"


def test_a_disconnect_during_a_long_prefill_frees_the_worker(server, taught_model, monkeypatch):
    """The long prompt's first chunk runs, the client hangs up, the API cancels the reply; no
    further chunk of that prompt runs, and the next request is served."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 16)
    events: list[str] = []
    prefilling, cancelled = threading.Event(), threading.Event()
    forward, cancel = taught_model.llm.forward, Reply.cancel

    def spy(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        events.append("decode" if embeds is None else
                      f"prefill {int(kwargs['position_ids'][0, 0])}+{embeds.shape[1]}")
        if len(events) == 1:  # the long prompt's first chunk: hold it until the API has cancelled
            prefilling.set()
            assert cancelled.wait(TIMEOUT), "the API noticed the disconnect"
        return forward(*args, **kwargs)

    def cancel_spy(self):
        if not self.cancelled:
            events.append("cancelled")
        cancelled.set()
        cancel(self)

    monkeypatch.setattr(taught_model.llm, "forward", spy)
    monkeypatch.setattr(Reply, "cancel", cancel_spy)
    body = json.dumps({"model": "demo", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "effusion " * 200}]}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    raw = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body))
    assert prefilling.wait(TIMEOUT), "the long prompt started to prefill"
    raw.close()  # the client goes away mid-prefill

    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
    reply = client.chat.completions.create(model="demo", max_tokens=16, messages=[
        image_message("What is this?", data_url(png_bytes(2)))])
    assert reply.choices[0].message.content == ANSWER
    # Of the abandoned prompt (200+ tokens) only its first 16 were computed: it would have gone
    # on with "prefill 16+16"; instead the next request's prompt starts at 0.
    assert events[0] == "prefill 0+16" and events[1] == "cancelled", events
    assert events[2].startswith("prefill 0+"), events
    assert server.engine.pending == 0
