"""The one generation path: batched (left-padded) greedy or sampled decoding, with a KV cache,
as a token-step iterator that `generate` collects and `stream` turns into text deltas."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch
from PIL import Image

from vlm.errors import ConfigError, InputError


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

    def guarded(self) -> "GenerationConfig":
        """This config with the repetition guard that chat and report drafting use by default
        (evaluation keeps plain greedy decoding, so its scores are not shaped by the guard)."""
        return dataclasses.replace(self, repetition_penalty=CHAT_REPETITION_PENALTY,
                                   no_repeat_ngram_size=CHAT_NO_REPEAT_NGRAM)


# The chat/drafting repetition guard: mild, so short answers are untouched, but a reply cannot
# loop ("MRI of the brain...%||MRI of the scalp%||..." until max tokens).
CHAT_REPETITION_PENALTY = 1.1
CHAT_NO_REPEAT_NGRAM = 4


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None


def prepare(model, messages_batch: list[list[dict]], images: list[list[Image.Image]]) -> Batch:
    """Encode conversations (ending at the assistant's turn) and images into a left-padded batch."""
    if len(messages_batch) != len(images):
        raise ConfigError("give one list of images per conversation.")
    sequences = []
    for messages, imgs in zip(messages_batch, images):
        encoded = model.prompts.encode(messages, add_generation_prompt=True)
        if encoded.num_images != len(imgs):
            raise InputError(
                f"the conversation has {encoded.num_images} {model.config.image_marker} markers but {len(imgs)} images."
            )
        sequences.append(encoded.input_ids)
    ids, mask = left_pad(sequences, model.tokenizer.pad_token_id)
    flat = [img for imgs in images for img in imgs]
    pixels = model.preprocess(flat) if flat else None
    return Batch(ids.to(model.device), mask.to(model.device), pixels)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask


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


@torch.no_grad()
def decode_steps(model, batch: Batch, gen: GenerationConfig, session: ConversationCache | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, step by step, until all stop or the budget ends.

    A finished sequence keeps yielding the pad id; callers cut each sequence at its first stop token.
    With a `session` (one conversation), the prompt tokens it has cached are not computed again.
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
    if reuse:
        # transformers 5: crop(-n) drops the last n cached tokens
        session.past.crop(reuse - session.past.get_seq_length())
        out = model(ids[:, reuse:], attention_mask=mask, position_ids=_positions(mask)[:, reuse:],
                    past_key_values=session.past, use_cache=True)
    else:
        out = model(ids, attention_mask=mask, pixel_values=batch.pixel_values,
                    position_ids=_positions(mask), use_cache=gen.use_cache)
    if session is not None:
        session.update(ids, out.past_key_values, key)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(gen.max_new_tokens):
        token = _choose(out.logits[:, -1, :].float(), gen, generator)
        token = token.masked_fill(finished, model.tokenizer.pad_token_id)
        yield token
        finished |= torch.isin(token, stops)
        if bool(finished.all()):
            return
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
    batch = prepare(model, messages_batch, images)
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generate_ids(model, batch, gen)]


class TextStream:
    """Text deltas of one reply as they are decoded; `num_tokens` counts the tokens so far."""

    def __init__(self, model, messages: list[dict], images: list[Image.Image], gen: GenerationConfig = GenerationConfig(),
                 session: ConversationCache | None = None):
        self.model, self.gen, self.session = model, gen, session
        self.batch = prepare(model, [messages], [images])
        self.num_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.batch.input_ids.shape[1])

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the conversation cache (known once decoding has started)."""
        return self.session.last_reused if self.session is not None else 0

    def __iter__(self) -> Iterator[str]:
        stops = stop_token_ids(self.model)
        ids: list[int] = []
        shown = ""
        for token in decode_steps(self.model, self.batch, self.gen, self.session):
            if int(token[0]) in stops:
                break
            ids.append(int(token[0]))
            self.num_tokens = len(ids)
            text = self.model.tokenizer.decode(ids, skip_special_tokens=True)
            # Hold back an incomplete multi-byte character until its last byte arrives.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text


def stream(model, messages: list[dict], images: list[Image.Image], gen: GenerationConfig = GenerationConfig()) -> Iterator[str]:
    """Text deltas of one reply as they are decoded."""
    return iter(TextStream(model, messages, images, gen))
