"""The API against the official `openai` client, and what its request parsing refuses.

The server runs the tiny taught model (tests/serve_fixtures.py) on 127.0.0.1; each test says
which OpenAI behaviour it checks. Conversations: without `conversation_id` nothing is shared
between requests (the prefix cache once leaked one client's prompt to another through
`cached_tokens`).
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve.engine import Engine, EngineBusy
from tests.serve_fixtures import ANSWER, TIMEOUT, data_url, png_bytes, serving

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")


@pytest.fixture(scope="module")
def api(taught_model):
    from serve.api import create_api

    engine = Engine(taught_model, queue_size=4, max_image_bytes=2**20, name="tiny")
    with serving(engine, lambda e: create_api(e, max_body_bytes=2 * 2**20)) as server:
        yield server


@pytest.fixture(scope="module")
def sdk(api):
    return openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def image_first(text: str, url: str) -> dict:
    """A user turn with the image before the text: the image's tokens start the prompt."""
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts}


def ask(sdk, messages, **extra):
    if "max_completion_tokens" not in extra:
        extra.setdefault("max_tokens", 16)
    return sdk.chat.completions.create(model="tiny", messages=messages, **extra)


def cached(reply) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


# ---- conversations and the prefix cache ---------------------------------------------------------

def test_requests_without_a_conversation_id_share_no_cache(sdk):
    url = data_url(png_bytes(11))
    first = ask(sdk, [image_first("Patient Jane Doe, 54, follow-up of a nodule.", url)])
    second = ask(sdk, [image_first("Patient", url)])  # another client probing with the same image
    assert first.choices[0].message.content and second.choices[0].message.content
    assert cached(first) == 0 and cached(second) == 0, "no prompt tokens of another request are reused"


def test_a_named_conversation_reuses_only_its_own_prefix(sdk):
    url = data_url(png_bytes(12))
    turn = [image_first("Is the heart enlarged?", url)]
    ask(sdk, turn)  # a one-off request with the same image first: it leaves nothing behind
    mine = ask(sdk, turn, extra_body={"conversation_id": "3f6c2a9e-mine"})
    assert cached(mine) == 0
    follow = turn + [{"role": "assistant", "content": mine.choices[0].message.content},
                     {"role": "user", "content": "And the pleura?"}]
    again = ask(sdk, follow, extra_body={"conversation_id": "3f6c2a9e-mine"})
    assert cached(again) >= mine.usage.prompt_tokens, "the prefix this client sent itself is reused"
    other = ask(sdk, follow, extra_body={"conversation_id": "b71d04c5-other"})
    assert cached(other) == 0, "another conversation with the same image starts cold"
    assert cached(ask(sdk, follow)) == 0, "and so does a request naming none"


def test_conversation_keys_depend_on_the_user_and_hide_the_id():
    from serve.api import conversation_key

    assert conversation_key("doc", None) is None
    keys = {conversation_key("doc", "a1"), conversation_key("nurse", "a1"), conversation_key("", "a1"),
            conversation_key("doc", "a2")}
    assert len(keys) == 4
    assert "secret-id" not in conversation_key("doc", "secret-id"), "logs show keys, never the id"


# ---- OpenAI features ----------------------------------------------------------------------------

def test_stop_strings_are_parsed_and_end_the_reply(sdk):
    from serve.openai_schema import ApiError, parse_generation

    assert parse_generation({"stop": "clear"}).stop == ("clear",)
    assert parse_generation({"stop": ["a", "b", "c", "d"]}).stop == ("a", "b", "c", "d")
    assert parse_generation({}).stop == ()
    for bad in (["a"] * 5, [""], "", [1], {"x": 1}):
        with pytest.raises(ApiError, match="'stop' must be"):
            parse_generation({"stop": bad})
    url = data_url(png_bytes(13))
    reply = ask(sdk, [image_first("What is this?", url)], stop=[" clear"])
    assert reply.choices[0].message.content == ANSWER.split(" clear")[0]
    assert reply.choices[0].finish_reason == "stop"


def test_the_repetition_guard_is_on_unless_the_body_sets_it():
    from serve.openai_schema import parse_generation
    from vlm.generation import GenerationConfig

    assert parse_generation({}) == GenerationConfig().guarded()
    chosen = parse_generation({"repetition_penalty": 1.0, "no_repeat_ngram_size": 0})
    assert (chosen.repetition_penalty, chosen.no_repeat_ngram_size) == (1.0, 0)
    one = parse_generation({"repetition_penalty": 1.3})  # the other field keeps the guard's value
    guard = GenerationConfig().guarded()
    assert (one.repetition_penalty, one.no_repeat_ngram_size) == (1.3, guard.no_repeat_ngram_size)


@pytest.mark.parametrize("extra, param, neutral", [
    ({"response_format": {"type": "json_object"}}, "response_format", {"response_format": {"type": "text"}}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format",
     {"response_format": {"type": "text"}}),
    ({"logprobs": True}, "logprobs", {"logprobs": False}),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs", {"logprobs": False}),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", {"tools": []}),
    ({"tool_choice": "required"}, "tool_choice", {"tool_choice": "none"}),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions", {"extra_body": {"functions": []}}),
])
def test_unsupported_openai_features_are_a_400_that_says_so(sdk, extra, param, neutral):
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(sdk, hello, **extra)
    error = refused.value.body
    assert "not supported" in error["message"] and error["param"] == param
    assert ask(sdk, hello, max_tokens=2, **neutral).choices[0].finish_reason in ("stop", "length"), \
        "the feature's neutral value is accepted"


def test_an_unknown_model_is_not_found(sdk):
    with pytest.raises(openai.NotFoundError) as refused:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.code == "model_not_found" and "tiny" in refused.value.body["message"]
    assert sdk.models.retrieve("tiny").id == "tiny"
    assert [m.id for m in sdk.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("medvlm")
    assert missing.value.code == "model_not_found"


def test_the_developer_role_is_a_system_message(sdk):
    as_system = ask(sdk, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
                    max_tokens=2)
    as_developer = ask(sdk, [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "hi"}],
                       max_tokens=2)
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def test_max_completion_tokens_wins_and_zero_is_refused(sdk):
    url = data_url(png_bytes(14))
    reply = ask(sdk, [image_first("What is this?", url)], extra_body={"max_tokens": 1}, max_completion_tokens=3)
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    for limits in ({"max_completion_tokens": 0}, {"max_tokens": 0, "max_completion_tokens": 8}):
        with pytest.raises(openai.BadRequestError, match="must be between 1 and"):
            sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **limits)


def test_streams_carry_usage_only_when_asked_as_a_last_chunk_without_choices(sdk):
    messages = [image_first("What is this?", data_url(png_bytes(15)))]
    plain = list(ask(sdk, messages, stream=True))
    assert all(chunk.usage is None for chunk in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == ANSWER
    counted = list(ask(sdk, messages, stream=True, stream_options={"include_usage": True}))
    *content, last = counted
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(chunk.usage is None and len(chunk.choices) == 1 for chunk in content)
    assert content[-1].choices[0].finish_reason == "stop"
    assert ask(sdk, messages).usage.completion_tokens > 0, "a plain reply always has usage"


@pytest.mark.parametrize("prefix", ["DATA:image/png;BASE64,", "Data:IMAGE/PNG;base64,",
                                    "data:image/png;charset=x;Base64,"])
def test_data_urls_are_read_in_any_case(sdk, prefix):
    url = prefix + data_url(png_bytes(16)).partition(",")[2]
    assert ask(sdk, [image_first("What is this?", url)]).choices[0].message.content == ANSWER


def test_a_wrong_method_on_a_known_route_is_405_with_allow(api):
    for method, path, allow in [("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"),
                                ("DELETE", "/v1/models/tiny", "GET"), ("POST", "/health", "GET")]:
        r = httpx.request(method, api.url + path, timeout=TIMEOUT)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and allow in error["message"]
    assert httpx.get(api.url + "/v1/nothing", timeout=TIMEOUT).status_code == 404


def test_a_full_queue_is_503_with_retry_after(taught_model):
    from fastapi.testclient import TestClient

    from serve.api import create_api

    class Full(Engine):
        def chat(self, *args, **kwargs):
            raise EngineBusy("The server is busy; please try again in a moment.")

    engine = Full(taught_model)
    with TestClient(create_api(engine), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_busy"
    assert int(r.headers["retry-after"]) >= 1
    engine.close()


# ---- bodies that used to crash or slip through --------------------------------------------------

HELLO = '"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'
BAD_BODIES = {  # name -> (raw body, a fragment of the reason)
    "nested 100k deep": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "NaN anywhere": ("{" + HELLO + ', "metadata": {"x": NaN}}', "NaN"),
    "Infinity": ("{" + HELLO + ', "temperature": Infinity}', "Infinity"),
    "a float that overflows": ("{" + HELLO + ', "top_p": 1e999}', "too large"),
    "an integer of 5000 digits": ("{" + HELLO + ', "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    "an integer too large for a float": ("{" + HELLO + ', "top_p": ' + "9" * 400 + "}", "'top_p' is out of range"),
    "seed of 2**63": ("{" + HELLO + f', "seed": {2**63}}}', "seed must be between 0 and"),
    "a negative seed": ("{" + HELLO + ', "seed": -1}', "seed must be between 0 and"),
    "huge max_tokens": ("{" + HELLO.replace('"max_tokens": 2', '"max_tokens": ' + "1" + "0" * 30) + "}",
                        "'max_tokens' must be between"),
    "temperature as a string": ("{" + HELLO + ', "temperature": "0.5"}', "'temperature' must be a number"),
    "a non-string conversation_id": ("{" + HELLO + ', "conversation_id": 7}', "'conversation_id' must be"),
    "a role that is not a string": ('{"messages": [{"role": ["user"], "content": "hi"}]}', "role must be"),
    "stream_options without a stream": ("{" + HELLO + ', "stream_options": {"include_usage": true}}',
                                        "only allowed with"),
    "a non-zero frequency_penalty": ("{" + HELLO + ', "frequency_penalty": 0.5}', "not supported"),
    "an unpaired surrogate in a message": ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    "an unpaired surrogate in a conversation_id": ("{" + HELLO + ', "conversation_id": "\\udc00"}', "surrogate"),
}


def test_bodies_that_used_to_crash_or_slip_through_get_a_400_with_the_reason(api):
    for name, (raw, fragment) in BAD_BODIES.items():
        r = httpx.post(api.url + "/v1/chat/completions", content=raw.encode(),
                       headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        assert fragment in r.json()["error"]["message"], (name, r.json())
        assert "Traceback" not in r.text
    good = httpx.post(api.url + "/v1/chat/completions", content=("{" + HELLO + "}").encode(),
                      headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert good.status_code == 200 and json.loads(good.text)["choices"]
