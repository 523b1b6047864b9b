"""The processor: chat template, `<image>` markers, image preprocessing and both batchers.

As in transformers' LLaVA, one object turns conversations and images into the tensors the model
takes, and it is the only code that knows about image markers:

- marker rules: `user_turn` puts one marker per attached image in front of a user text that has
  none, `strip_markers` removes markers a user typed, `with_markers` puts the markers in front of
  the first user turn when no message carries one. Content given as a list of parts
  (`{"type": "text", "text": ...}` / `{"type": "image"}`, the OpenAI/transformers shape) becomes
  text with one marker per image part; markers typed inside text parts are dropped.
- the placeholder contract (docs/architecture.md, README): encoding expands each marker into exactly N copies of the
  image-placeholder token id, N being the number of projected image tokens. Labels are -100
  everywhere except on assistant replies (their text and the end-of-turn token), so the system
  prompt, user turns and image positions are never learned.
- the batchers check one marker per image and pad: left for generation (`generation_batch`),
  right for training (`training_batch`).

The model itself takes tensors; its own placeholder-count check is the contract's last guard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from vlm.errors import ConfigError, InputError

IGNORE_INDEX = -100

# ChatML, used when a tokenizer brings no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int


@dataclass
class Batch:
    """A left-padded generation batch, on the model's device."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None


@dataclass(eq=False)
class Processor:
    """Conversations and images -> token ids, labels, masks and pixel values (see the module doc).

    `vision` is the image tower (its letterbox and normalisation); `device()` says where a
    generation batch goes (the model's device)."""

    tokenizer: Any
    vision: Any
    image_marker: str
    image_token_id: int
    num_image_tokens: int
    system_prompt: str
    device: Callable[[], torch.device]

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = CHATML_TEMPLATE

    # ---- markers -------------------------------------------------------------------------------

    def strip_markers(self, text: str) -> str:
        """`text` without image markers (a marker typed by a user would count as an image)."""
        return text.replace(self.image_marker, "")

    def user_turn(self, text: str, n_images: int) -> dict:
        """A user turn; one image marker per attached image is put in front if the text has none."""
        if n_images and self.image_marker not in text:
            text = "\n".join([self.image_marker] * n_images + [text])
        return {"role": "user", "content": text}

    def with_markers(self, messages: list[dict], n_images: int) -> list[dict]:
        """`messages` as text (parts joined, see the module doc), with the markers of `n_images`
        images put in front of the first user turn when no message carries one."""
        messages = [self._as_text(m) for m in messages]
        if n_images and not any(self.image_marker in str(m.get("content", "")) for m in messages):
            first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
            if first is not None:
                messages[first] = self.user_turn(str(messages[first].get("content", "")), n_images)
        return messages

    def _as_text(self, message: dict) -> dict:
        """A copy of `message`; list-of-parts content joined into text with one marker per image part."""
        message = dict(message)
        parts = message.get("content")
        if isinstance(parts, list):
            pieces = []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    pieces.append(self.image_marker)
                elif kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(self.strip_markers(part["text"]))
                else:
                    raise InputError("a content part must be {'type': 'text', 'text': ...} or {'type': 'image'}.")
            message["content"] = "\n".join(pieces)
        return message

    def check_images(self, encoded: Encoded, n_images: int) -> None:
        """InputError unless the conversation has one marker per image."""
        if encoded.num_images != n_images:
            raise InputError(
                f"the conversation has {encoded.num_images} {self.image_marker} markers but {n_images} images; "
                "it needs one marker per image."
            )

    # ---- encoding ------------------------------------------------------------------------------

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        """Token ids and labels for a conversation.

        `messages` are {"role": "user"|"assistant"|"system", "content": str or parts}. With
        add_generation_prompt the ids end where the assistant's next reply starts (inference).
        """
        messages = self._with_system(messages)
        segments = self._segments(messages, add_generation_prompt)
        ids: list[int] = []
        labels: list[int] = []
        for text, learned in segments:
            piece = self._tokenize(text)
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        num_images = ids.count(self.image_token_id) // max(self.num_image_tokens, 1)
        return Encoded(ids, labels, num_images)

    def _with_system(self, messages: list[dict]) -> list[dict]:
        messages = [self._as_text(m) if isinstance(m, dict) else m for m in messages]
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                role = m.get("role") if isinstance(m, dict) else None
                raise InputError(f"message role must be system, user or assistant, got {role!r}.")
            if not isinstance(m.get("content"), str):
                raise InputError("message content must be text.")
        if messages and messages[0]["role"] == "system":
            return messages
        return [{"role": "system", "content": self.system_prompt}, *messages]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, learned) pieces.

        Rendering growing prefixes of the conversation (rather than string surgery on one render)
        keeps this correct for any template in which a conversation's rendering starts with the
        rendering of its prefix, which holds for ChatML, Llama and Mistral templates.
        """
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            header = self._render(messages[:i], add_generation_prompt=True)
            full = self._render(messages[: i + 1], add_generation_prompt=False)
            if not header.startswith(done) or not full.startswith(header):
                raise InputError("the chat template does not render conversations prefix by prefix.")
            segments += [(header[len(done):], False), (full[len(header):], True)]
            done = full
        tail = self._render(messages, add_generation_prompt)
        segments.append((tail[len(done):], False))
        return [(text, learned) for text, learned in segments if text]

    def _tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(self.image_marker)):
            if k > 0:
                ids += [self.image_token_id] * self.num_image_tokens
            if part:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"]
        return ids

    # ---- images and batches --------------------------------------------------------------------

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised [B, 3, S, S] on the tower's device: the whole image letterboxed
        (vlm.vision.letterbox) and normalised with the tower's statistics."""
        return self.vision.preprocess(images)

    def _encode_all(self, conversations: list[list[dict]], images: list[list[Image.Image]],
                    add_generation_prompt: bool) -> list[Encoded]:
        if len(conversations) != len(images):
            raise ConfigError("give one list of images per conversation.")
        encoded = []
        for messages, imgs in zip(conversations, images):
            e = self.encode(list(messages), add_generation_prompt=add_generation_prompt)
            self.check_images(e, len(imgs))
            encoded.append(e)
        return encoded

    def generation_batch(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> Batch:
        """Conversations (ending at the assistant's turn) and their images as a left-padded batch
        on the model's device."""
        encoded = self._encode_all(conversations, images, add_generation_prompt=True)
        ids, mask = left_pad([e.input_ids for e in encoded], self.tokenizer.pad_token_id)
        device = self.device()
        flat = [img for imgs in images for img in imgs]
        pixels = self.preprocess(flat).to(device) if flat else None
        return Batch(ids.to(device), mask.to(device), pixels)

    def training_batch(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> dict:
        """Right-padded input_ids, labels (assistant tokens only) and attention_mask, and the
        images preprocessed (pixel_values, None without images); tensors stay where they are made."""
        encoded = self._encode_all(conversations, images, add_generation_prompt=False)
        width = max(len(e.input_ids) for e in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            n = len(e.input_ids)
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        flat = [img for imgs in images for img in imgs]
        pixels = self.preprocess(flat) if flat else None
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
