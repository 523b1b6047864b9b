"""The generation path's limits and guards: the context limit, chunked prefill that stops on
cancel, stop strings, the repetition guard (on for chat, off for evaluation), and the engine's
byte-bounded KV caches and one-off conversations."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

import vlm.generation as generation
from serve.engine import Engine
from tests.serve_fixtures import ANSWER, png_bytes
from vlm.errors import ConfigError, InputError
from vlm.generation import GenerationConfig, TextStream, cache_bytes, context_length, generate

WHAT = [{"role": "user", "content": "<image>\nWhat is this?"}]


def image(seed: int = 1) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(seed)))


def long_text(model, tokens: int) -> str:
    """A user text of at least `tokens` tokens."""
    text = "effusion " * tokens
    assert len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) >= tokens
    return text


def test_a_prompt_longer_than_the_context_is_refused_with_the_limits(taught_model):
    limit = context_length(taught_model)
    messages = [{"role": "user", "content": long_text(taught_model, limit)}]
    with pytest.raises(InputError, match=f"context of {limit:,} tokens"):
        TextStream(taught_model, messages, [], GenerationConfig(max_new_tokens=8))
    fits = [{"role": "user", "content": "effusion " * (limit // 8)}]
    TextStream(taught_model, fits, [], GenerationConfig(max_new_tokens=8))  # no error
    with pytest.raises(InputError, match="max_tokens 400"):  # the reply's budget counts too
        TextStream(taught_model, fits, [], GenerationConfig(max_new_tokens=400))


def test_a_long_prompt_is_prefilled_in_chunks_and_a_cancel_stops_between_them(taught_model, monkeypatch):
    """The LLM sees the prompt chunk by chunk; once the request is cancelled no further chunk
    runs and nothing is decoded, so the worker is free for the next request."""
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 16)
    events: list[str] = []
    forward = taught_model.llm.forward

    def spy(*args, **kwargs):
        events.append(f"llm {kwargs['inputs_embeds'].shape[1] if kwargs.get('inputs_embeds') is not None else 1}")
        return forward(*args, **kwargs)

    monkeypatch.setattr(taught_model.llm, "forward", spy)
    messages = [{"role": "user", "content": long_text(taught_model, 200)}]
    stream = TextStream(taught_model, messages, [], GenerationConfig(max_new_tokens=4),
                        cancelled=lambda: len(events) >= 2)
    assert stream.prompt_tokens > 100
    assert list(stream) == [] and events == ["llm 16", "llm 16"], "cancelled after the second chunk"

    events.clear()
    reply = Engine(taught_model)
    first = reply.chat(None, messages, [], GenerationConfig(max_new_tokens=4))
    first.cancel()  # e.g. the client went away while it waited or prefilled
    second = reply.chat(None, WHAT, [image()], GenerationConfig(max_new_tokens=12))
    assert second.text() == ANSWER and first.text() == "" and first.finish_reason == "cancelled"
    reply.close()


def test_one_pass_and_chunked_prefill_give_the_same_answer(taught_model, monkeypatch):
    question = [{"role": "user", "content": "<image>\nIs the heart enlarged?"}]
    whole = generate(taught_model, [question], [[image(3)]], GenerationConfig(max_new_tokens=12))
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 5)
    assert generate(taught_model, [question], [[image(3)]], GenerationConfig(max_new_tokens=12)) == whole
    assert "".join(TextStream(taught_model, question, [image(3)], GenerationConfig(max_new_tokens=12))) == whole[0]


@pytest.mark.parametrize("stop, expected", [(("clear",), "The lungs are"), ((" are", "lungs"), "The"),
                                            (("absent",), ANSWER)])
def test_stop_strings_cut_the_reply_before_them(taught_model, stop, expected):
    gen = GenerationConfig(max_new_tokens=16, stop=stop)
    stream = TextStream(taught_model, WHAT, [image()], gen)
    deltas = list(stream)
    assert "".join(deltas).strip() == expected and stream.finish_reason == "stop"
    assert all(s not in "".join(deltas) for s in stop)
    assert generate(taught_model, [WHAT], [[image()]], gen) == [expected]


def test_the_repetition_guard_stops_loops_and_is_off_unless_asked(tiny_model):
    """An untrained model loops; with no_repeat_ngram_size no 3-gram repeats, and the plain
    config (what evaluation uses) decodes exactly as before the guard existed."""
    prompt = [{"role": "user", "content": "The lungs are clear."}]

    def ngrams(ids, n=3):
        return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]

    def ids(gen):
        batch = tiny_model.processor.generation_batch([prompt], [[]])
        return [int(t[0]) for t in generation.decode_steps(tiny_model, batch, gen)]

    plain = ids(GenerationConfig(max_new_tokens=40))
    assert len(set(ngrams(plain))) < len(ngrams(plain)), "the untrained model repeats itself"
    guarded = ids(GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=3))
    assert len(set(ngrams(guarded))) == len(ngrams(guarded))
    assert GenerationConfig().repetition_penalty == 1.0 and GenerationConfig().no_repeat_ngram_size == 0
    chat = GenerationConfig().guarded()
    assert chat.repetition_penalty > 1.0 and chat.no_repeat_ngram_size > 0


def test_min_new_tokens_bars_the_stop_tokens_for_that_many_tokens(taught_model):
    """The taught model answers in a few tokens and stops; with min_new_tokens it goes on to exactly
    that many, none of them a stop token (what `bench lora-merge` times a decode rate with)."""
    stops = generation.stop_token_ids(taught_model)
    batch = taught_model.processor.generation_batch([taught_model.processor.with_markers(WHAT, 1)], [[image()]])

    def ids(gen):
        return [int(t[0]) for t in generation.decode_steps(taught_model, batch, gen)]

    plain = ids(GenerationConfig(max_new_tokens=24))
    assert len(plain) < 24 and plain[-1] in stops
    forced = ids(GenerationConfig(max_new_tokens=24, min_new_tokens=24))
    assert len(forced) == 24 and not stops & set(forced)
    assert forced[:len(plain) - 1] == plain[:-1]  # the same greedy tokens until the stop would come
    with pytest.raises(ConfigError):
        GenerationConfig(max_new_tokens=4, min_new_tokens=5)


def test_repetition_penalty_lowers_the_logits_of_tokens_already_in_the_reply():
    guard = generation.RepetitionGuard(GenerationConfig(repetition_penalty=2.0), rows=1)
    guard.add(torch.tensor([1]), torch.tensor([False]))
    logits = guard(torch.tensor([[1.0, 4.0, -1.0]]))
    assert logits.tolist() == [[1.0, 2.0, -1.0]]
    guard.add(torch.tensor([2]), torch.tensor([False]))
    assert guard(torch.tensor([[1.0, 4.0, -1.0]])).tolist() == [[1.0, 2.0, -2.0]]


def test_kv_caches_are_bounded_by_bytes_oldest_dropped_first(taught_model):
    engine = Engine(taught_model)
    engine.chat("a", WHAT, [image(1)], GenerationConfig(max_new_tokens=8)).text()
    one = engine.cache_bytes()
    assert one > 0
    engine.max_cache_bytes = int(one * 1.5)  # room for one conversation's cache, not two
    engine.chat("b", WHAT, [image(2)], GenerationConfig(max_new_tokens=8)).text()
    assert engine.cache_bytes() <= engine.max_cache_bytes
    assert engine._conversations["a"].cache.past is None and engine._conversations["b"].cache.past is not None
    follow = engine.chat("b", WHAT + [{"role": "assistant", "content": ANSWER},
                                      {"role": "user", "content": "And the pleura?"}], None,
                         GenerationConfig(max_new_tokens=8))
    follow.text()
    assert follow.cached_tokens > 0, "the recent conversation still reuses its cache"
    assert engine.images("a"), "dropping a cache keeps the conversation's image"
    engine.close()


def test_a_one_off_conversation_keeps_nothing_and_reuses_nothing(taught_model):
    engine = Engine(taught_model)
    for _ in range(2):
        reply = engine.chat(None, WHAT, [image(1)], GenerationConfig(max_new_tokens=8))
        assert reply.text() == ANSWER and reply.cached_tokens == 0
    assert engine.cache_bytes() == 0 and not engine._conversations
    engine.close()


def test_uploads_are_decoded_by_the_worker_after_admission(taught_model):
    engine = Engine(taught_model)
    reply = engine.chat("u", WHAT, [png_bytes(1)], GenerationConfig(max_new_tokens=8))
    assert reply.text() == ANSWER and engine.images("u")[0].size == (48, 48)
    bad = engine.chat("v", WHAT, [b"not an image"], GenerationConfig(max_new_tokens=8))
    with pytest.raises(InputError, match="not a PNG, JPEG or DICOM"):
        bad.text()
    engine.close()


def test_cache_bytes_counts_every_layer(taught_model):
    from transformers import DynamicCache

    past = DynamicCache()
    k = torch.zeros(1, 2, 5, 16)
    past.update(k, k, 0)
    past.update(k, k, 1)
    assert cache_bytes(past) == 4 * k.numel() * k.element_size() and cache_bytes(None) == 0
