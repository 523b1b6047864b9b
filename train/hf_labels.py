"""Training batches for transformers image-text-to-text models: the model's own chat template and
image expansion, labels on the assistant replies alone.

Where each reply starts and ends comes from the template itself, rendered prefix by prefix as
vlm/processor.py does for our own models: rendering messages[:i] with the generation prompt gives the
context of reply i, and what rendering messages[:i+1] adds to that is the reply. Nothing searches the
text for role names. The pieces are tokenized apart (a prompt is tokenized alone at inference too), the
pieces holding images by the processor, which expands them into the model's image tokens.

Learned: each reply's tokens up to and including its first end-of-turn token (one of the model's
generation stop ids: Gemma's <end_of_turn>, Qwen's <|im_end|>, SmolVLM's <end_of_utterance>); what the
template writes after it (a newline before the next turn) is not. A template whose replies end with no
stop token (llava-1.5's "USER: ... ASSISTANT: reply ") gets the tokenizer's EOS after each reply, as in
LLaVA's own training data, or the model would never learn to stop. Everything else (system prompt, user
turns, image tokens, padding) is -100.

The batch itself is the processor's, for all conversations at once and right-padded, so every
family-specific input (Gemma 3's token_type_ids, Qwen's image_grid_thw and mm_token_type_ids,
Idefics3's pixel_attention_mask) is there as the model expects it; its token ids must equal the pieces'
(an InputError names the record otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vlm.assistant import as_parts
from vlm.errors import ConfigError, InputError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered conversation: its text, whether it is a reply, how many images it holds."""
    text: str
    learned: bool
    images: int


@dataclass(frozen=True)
class Encoded:
    """One conversation: the text the processor gets, its token ids, which are learned, its images."""
    text: str
    input_ids: list[int]
    learned: list[bool]
    images: list[Image.Image]
    add_special_tokens: bool


class ConversationEncoder:
    """Conversations with images -> right-padded training batches with labels (see the module doc)."""

    def __init__(self, processor, stop_ids: set[int]):
        self.processor, self.tokenizer = processor, processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ConfigError("the model's tokenizer has no pad token; training batches need one.")
        self.tokenizer.padding_side = "right"
        self.stop_ids = set(stop_ids) | ({self.tokenizer.eos_token_id} - {None})
        if not self.stop_ids:
            raise ConfigError("the model names no end-of-turn token (generation_config.eos_token_id, the tokenizer's EOS).")

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def segments(self, messages: list[dict]) -> list[Segment]:
        """The rendered conversation cut at the template's own turn boundaries (list-of-parts messages)."""
        segments: list[Segment] = []
        done, seen = "", 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if any(part["type"] == "image" for part in message["content"]):
                raise InputError("an image belongs in a user turn, not in an assistant reply.")
            if not any(m["role"] == "user" for m in messages[:i]):
                raise InputError("an assistant reply needs a user turn before it.")
            header = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1], add_generation_prompt=False)
            if not header.startswith(done) or not full.startswith(header):
                raise InputError("the chat template does not render conversations prefix by prefix.")
            segments += [Segment(header[len(done):], False, _images(messages[seen:i])),
                         Segment(full[len(header):], True, 0)]
            done, seen = full, i + 1
        tail = self._render(messages, add_generation_prompt=False)[len(done):]
        if tail or _images(messages[seen:]):
            segments.append(Segment(tail, False, _images(messages[seen:])))
        return segments

    def encode(self, messages: list[dict], images: list[Image.Image]) -> Encoded:
        """Token ids and learned flags of one conversation ({"role", "content"} messages, `<image>`
        markers or image parts, one per image)."""
        segments = self.segments(as_parts(messages, len(images)))
        bos = self.tokenizer.bos_token
        # A template that writes BOS itself (Gemma 3's) gets no second one from the tokenizer: the rule of
        # transformers' apply_chat_template(tokenize=True), and of vlm.hf_assistant at inference.
        special = not (bos and segments and segments[0].text.startswith(bos))
        texts, ids, learned, left = [], [], [], list(images)
        for k, segment in enumerate(segments):
            text, first = segment.text, special and k == 0
            if segment.learned:
                piece = self._tokens(text)
                if not self.stop_ids & set(piece):
                    if self.tokenizer.eos_token is None:
                        raise ConfigError("the template ends replies with no end-of-turn token and the tokenizer has no EOS.")
                    text += self.tokenizer.eos_token
                    piece = self._tokens(text)
                end = next(j for j, token in enumerate(piece) if token in self.stop_ids) + 1
                flags = [True] * end + [False] * (len(piece) - end)
            else:
                mine, left = left[: segment.images], left[segment.images:]
                piece = self._tokens(text, mine, first)
                flags = [False] * len(piece)
            texts.append(text)
            ids += piece
            learned += flags
        return Encoded("".join(texts), ids, learned, list(images), special)

    def _tokens(self, text: str, images: list[Image.Image] = (), add_special_tokens: bool = False) -> list[int]:
        if not images:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        out = self.processor(text=[text], images=[list(images)], add_special_tokens=add_special_tokens,
                             return_tensors="pt")
        return out["input_ids"][0].tolist()

    def batch(self, encoded: list[Encoded]) -> dict:
        """The processor's right-padded batch of `encoded`, with `labels`."""
        if len({e.add_special_tokens for e in encoded}) != 1:
            raise InputError("conversations of one batch must all start alike (with or without the BOS token).")
        images = [e.images for e in encoded]
        inputs = self.processor(text=[e.text for e in encoded], images=images if any(images) else None,
                                padding=True, return_tensors="pt", add_special_tokens=encoded[0].add_special_tokens)
        labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            if inputs["input_ids"][row, :n].tolist() != e.input_ids or int(inputs["attention_mask"][row].sum()) != n:
                raise InputError("the processor tokenizes this conversation differently as a whole than turn by turn; "
                                 "its labels cannot be placed.")
            ids = torch.tensor(e.input_ids)
            labels[row, :n] = torch.where(torch.tensor(e.learned), ids, torch.full_like(ids, IGNORE_INDEX))
        return {**inputs, "labels": labels}


def _images(messages: list[dict]) -> int:
    return sum(part["type"] == "image" for m in messages for part in m["content"])
