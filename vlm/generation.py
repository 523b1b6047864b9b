"""The one generation path: batched greedy or sampled decoding over the processor's left-padded
batches, with a KV cache, as a token-step iterator that `generate` collects and `TextStream`
turns into text deltas."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image

from vlm.errors import ConfigError, InputError
from vlm.processor import Batch


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding (evaluation always uses it)."""
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True
    """Off recomputes the whole sequence every step (only useful to check the cache)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply; the reply is cut before the first one (not included)."""
    repetition_penalty: float = 1.0
    """Divides the logits of tokens already generated in this reply (>1 discourages repeats; 1 is off)."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of this many tokens from appearing twice in one reply (0 is off)."""
    min_new_tokens: int = 0
    """Bar the stop tokens for this many first tokens (0 is off): a benchmark that times a fixed
    number of tokens sets it to max_new_tokens."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1].")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be between 0 and {MAX_SEED}.")
        if not 1.0 <= self.repetition_penalty <= 10.0 or self.no_repeat_ngram_size < 0:
            raise ConfigError("repetition_penalty must be between 1 and 10 and no_repeat_ngram_size at least 0.")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop must be a tuple of non-empty strings.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("min_new_tokens must be between 0 and max_new_tokens.")

    def guarded(self) -> "GenerationConfig":
        """This config with the repetition guard that chat and report drafting use by default
        (evaluation keeps plain greedy decoding, so its scores are not shaped by the guard)."""
        return dataclasses.replace(self, repetition_penalty=CHAT_REPETITION_PENALTY,
                                   no_repeat_ngram_size=CHAT_NO_REPEAT_NGRAM)


# The chat/drafting repetition guard: mild, so short answers are untouched, but a reply cannot
# loop ("MRI of the brain...%||MRI of the scalp%||..." until max tokens).
CHAT_REPETITION_PENALTY = 1.1
CHAT_NO_REPEAT_NGRAM = 4


def stop_token_ids(model) -> set[int]:
    ids = {model.tokenizer.eos_token_id}
    configured = getattr(getattr(model.llm, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


class ConversationCache:
    """The KV cache of one conversation's tokens so far, so that its next turn computes only the
    new tokens: the image is neither re-encoded nor re-attended. One conversation (batch of 1)."""

    def __init__(self):
        self.ids: list[int] = []
        self.past = None
        self.images_key = ""
        self.last_reused = 0
        """Prompt tokens the latest turn took from the cache."""

    def reusable_length(self, ids: list[int], image_token_id: int, images_key: str = "") -> int:
        """How many leading tokens of `ids` the cache already holds (0 if it cannot serve them).

        Placeholder ids look the same for every image, so the images themselves (`images_key`, a
        digest of their pixels) must match too."""
        if self.past is None or images_key != self.images_key:
            return 0
        n = 0
        for cached, new in zip(self.ids, ids):
            if cached != new:
                break
            n += 1
        n = min(n, len(ids) - 1)  # the last prompt token must be fed to get the next-token logits
        last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        return n if last_image < n else 0  # reuse only when every image position is cached

    def update(self, fed_ids: torch.Tensor, past, images_key: str) -> None:
        self.ids, self.past, self.images_key = fed_ids[0].tolist(), past, images_key


def images_digest(pixel_values: torch.Tensor | None) -> str:
    if pixel_values is None:
        return ""
    return hashlib.sha1(pixel_values.detach().float().cpu().numpy().tobytes()).hexdigest()


PREFILL_CHUNK = 512
"""Prompt tokens fed to the LLM per forward pass. A longer prompt is prefilled in chunks, and a
cancelled request stops between two chunks instead of holding the worker for the whole prompt.
Eval prompts are far shorter, so their logits are computed exactly as in one pass."""


def context_length(model) -> int:
    """The most tokens (prompt + reply) the LLM was built for."""
    return int(getattr(model.llm.config, "max_position_embeddings", None) or model.config.max_length)


def check_fits(model, prompt_tokens: int, max_new_tokens: int) -> None:
    """InputError when the prompt leaves no room for `max_new_tokens` in the model's context."""
    check_room(context_length(model), prompt_tokens, max_new_tokens)


def check_room(limit: int, prompt_tokens: int, max_new_tokens: int) -> None:
    """InputError when `prompt_tokens` + `max_new_tokens` exceed a context of `limit` tokens."""
    if prompt_tokens + max_new_tokens > limit:
        raise InputError(
            f"The prompt is {prompt_tokens:,} tokens; with max_tokens {max_new_tokens:,} it exceeds the model's "
            f"context of {limit:,} tokens. Shorten the conversation to at most {max(limit - max_new_tokens, 0):,} "
            "prompt tokens, or ask for fewer new tokens.")


def cache_bytes(past) -> int:
    """Bytes held by a KV cache's tensors (0 for none)."""
    total = 0
    for layer in getattr(past, "layers", None) or []:
        total += sum(t.numel() * t.element_size() for t in vars(layer).values() if isinstance(t, torch.Tensor))
    return total


@torch.no_grad()
def decode_steps(model, batch: Batch, gen: GenerationConfig, session: ConversationCache | None = None,
                 cancelled=None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, step by step, until all stop or the budget ends.

    A finished sequence keeps yielding the pad id; callers cut each sequence at its first stop token.
    With a `session` (one conversation), the prompt tokens it has cached are not computed again.
    `cancelled()` (optional) is asked between prefill chunks: when it says yes, nothing is yielded.
    """
    if session is not None and (batch.input_ids.shape[0] != 1 or not gen.use_cache):
        raise ConfigError("a conversation cache serves one conversation with use_cache on.")
    stops = torch.tensor(sorted(stop_token_ids(model)), device=batch.input_ids.device)
    generator = torch.Generator(device="cpu").manual_seed(gen.seed) if gen.seed is not None else None
    ids, mask = batch.input_ids, batch.attention_mask
    key = images_digest(batch.pixel_values) if session else ""
    reuse = session.reusable_length(ids[0].tolist(), model.image_token_id, key) if session else 0
    if session is not None:
        session.last_reused = reuse
    if not gen.use_cache:
        out = model(ids, attention_mask=mask, pixel_values=batch.pixel_values,
                    position_ids=_positions(mask), use_cache=False)
    else:
        past = None
        if reuse:
            past = session.past
            past.crop(reuse - past.get_seq_length())  # transformers 5: crop(-n) drops the last n cached tokens
        out = _prefill(model, ids, mask, None if reuse else batch.pixel_values, past, reuse, cancelled)
        if out is None:
            if session is not None:
                session.update(ids[:, :0], None, "")  # a half-built cache serves nobody
            return
    if session is not None:
        session.update(ids, out.past_key_values, key)
    guard = RepetitionGuard(gen, ids.shape[0])
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(gen.max_new_tokens):
        logits = guard(out.logits[:, -1, :].float())
        if step < gen.min_new_tokens:
            logits[:, stops] = float("-inf")
        token = _choose(logits, gen, generator)
        token = token.masked_fill(finished, model.tokenizer.pad_token_id)
        guard.add(token, finished)
        yield token
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or step == gen.max_new_tokens - 1:
            return  # (the last step's token needs no forward pass after it)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if gen.use_cache:
            position = _positions(mask)[:, -1:]
            out = model.llm(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                            past_key_values=out.past_key_values, use_cache=True)
            if session is not None:
                session.update(ids, out.past_key_values, key)
        else:
            out = model(ids, attention_mask=mask, pixel_values=batch.pixel_values,
                        position_ids=_positions(mask), use_cache=False)


def _prefill(model, ids, mask, pixel_values, past, start: int, cancelled):
    """Feed prompt tokens `start:` (the images written in) in PREFILL_CHUNK pieces onto `past`;
    the last piece's output, or None when `cancelled()` said stop between two pieces."""
    embeds = model.embed(ids[:, start:], pixel_values)
    positions = _positions(mask)
    out = None
    for lo in range(start, ids.shape[1], PREFILL_CHUNK):
        if out is not None and cancelled is not None and cancelled():
            return None
        hi = min(lo + PREFILL_CHUNK, ids.shape[1])
        out = model.llm(inputs_embeds=embeds[:, lo - start:hi - start], attention_mask=mask[:, :hi],
                        position_ids=positions[:, lo:hi], past_key_values=past, use_cache=True)
        past = out.past_key_values
    return out


class RepetitionGuard:
    """GenerationConfig's repetition_penalty and no_repeat_ngram_size over each row's reply so far
    (the prompt is not counted: an answer may repeat the question's words)."""

    def __init__(self, gen: GenerationConfig, rows: int):
        self.penalty, self.n = gen.repetition_penalty, gen.no_repeat_ngram_size
        self.replies: list[list[int]] = [[] for _ in range(rows)]

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 or self.n > 0

    def add(self, token: torch.Tensor, finished: torch.Tensor) -> None:
        if self.active:
            for row, (t, done) in enumerate(zip(token.tolist(), finished.tolist())):
                if not done:
                    self.replies[row].append(t)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        logits = logits.clone()
        for row, reply in enumerate(self.replies):
            if self.penalty != 1.0 and reply:
                seen = torch.tensor(sorted(set(reply)), device=logits.device)
                values = logits[row, seen]
                logits[row, seen] = torch.where(values > 0, values / self.penalty, values * self.penalty)
            banned = self._banned(reply)
            if banned:
                logits[row, sorted(banned)] = float("-inf")
        return logits

    def _banned(self, reply: list[int]) -> set[int]:
        """Tokens that would complete an n-gram this reply already holds."""
        n = self.n
        if n <= 0 or len(reply) < n - 1:
            return set()
        tail = reply[len(reply) - n + 1:] if n > 1 else []
        return {reply[i + n - 1] for i in range(len(reply) - n + 1) if reply[i:i + n - 1] == tail}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts every real token; positions count only real tokens.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _choose(logits: torch.Tensor, gen: GenerationConfig, generator) -> torch.Tensor:
    if gen.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / gen.temperature, dim=-1)
    if gen.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < gen.top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    """The ids before the first stop token."""
    return ids[:next((k for k, t in enumerate(ids) if t in stops), len(ids))]


def generate_ids(model, batch: Batch, gen: GenerationConfig) -> list[list[int]]:
    """Generated token ids per sequence, cut before the first stop token."""
    stops = stop_token_ids(model)
    steps = [token.tolist() for token in decode_steps(model, batch, gen)]
    return [cut_at_stop([step[row] for step in steps], stops) for row in range(batch.input_ids.shape[0])]


def generate(model, messages_batch, images, gen: GenerationConfig = GenerationConfig()) -> list[str]:
    """Replies (text) to a batch of conversations, one list of PIL images per conversation."""
    batch = model.processor.generation_batch(messages_batch, images)
    texts = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in generate_ids(model, batch, gen)]
    return [cut_at_stop_string(text, gen.stop)[0].strip() for text in texts]


def cut_at_stop_string(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` before the first of `stops`, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class TextStream:
    """Text deltas of one reply as they are decoded; `num_tokens` counts the tokens so far.

    The reply ends at a stop token, at the first of `gen.stop` (cut before it; text that could be
    the start of one is held back until it is not), or after `gen.max_new_tokens`; then
    `finish_reason` is "stop" or "length". `cancelled()` is passed to decode_steps. A prompt that
    leaves no room for the reply in the model's context is an InputError."""

    def __init__(self, model, messages: list[dict], images: list[Image.Image], gen: GenerationConfig = GenerationConfig(),
                 session: ConversationCache | None = None, cancelled=None):
        self.model, self.gen, self.session, self.cancelled = model, gen, session, cancelled
        self.batch = model.processor.generation_batch([messages], [images])
        check_fits(model, self.prompt_tokens, gen.max_new_tokens)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch.input_ids.shape[1])

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the conversation cache (known once decoding has started)."""
        return self.session.last_reused if self.session is not None else 0

    def __iter__(self) -> Iterator[str]:
        steps = (int(token[0]) for token in decode_steps(self.model, self.batch, self.gen, self.session, self.cancelled))
        decode = lambda ids: self.model.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        yield from text_deltas(steps, stop_token_ids(self.model), decode, self.gen.stop, self)


def text_deltas(tokens: Iterator[int], end_ids: set[int], decode, stops: tuple[str, ...], reply) -> Iterator[str]:
    """The text deltas of a reply's token ids (vlm.generation.DeltaText), up to an end token, a
    stop string or the tokens' end; keeps `reply.num_tokens` and `reply.finish_reason` ("stop" or
    "length") up to date. Every streaming kind of assistant shows its tokens through this."""
    text = DeltaText(decode, stops)
    reply.finish_reason = "length"
    for token in tokens:
        if token in end_ids:
            reply.finish_reason = "stop"
            break
        delta = text.push(token)
        reply.num_tokens = len(text.ids)
        if delta:
            yield delta
        if text.hit:
            reply.finish_reason = "stop"
            return
    if rest := text.flush():
        yield rest


class DeltaText:
    """Token ids, one at a time, -> the text deltas a reader may be shown: the reply is cut before
    the first of `stops` (text that could be the start of one is held back until it is not), and an
    incomplete multi-byte character is held back until its last byte arrives. `hit` says a stop
    string was found (then nothing more is shown)."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.shown = ""
        self.hit = False

    def push(self, token_id: int) -> str:
        if self.hit:
            return ""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        text, self.hit = cut_at_stop_string(text, self.stops)
        ready = text if self.hit else text[:len(text) - _held_back(text, self.stops)]
        return self._show(ready)

    def flush(self) -> str:
        """What was held back for a stop string that never came (at the end of the reply)."""
        if self.hit:
            return ""
        text = cut_at_stop_string(self.decode(self.ids), self.stops)[0]
        return self._show(text.rstrip("\ufffd"))  # an incomplete character at the budget's end stays unshown

    def _show(self, ready: str) -> str:
        if len(ready) > len(self.shown) and ready.startswith(self.shown):
            delta, self.shown = ready[len(self.shown):], ready
            return delta
        return ""
