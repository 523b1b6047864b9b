"""Chat template, `<image>` placeholder expansion, label masking and the task prompts.

The placeholder contract (DESIGN.md): a message carries one `<image>` marker per image; encoding
expands each marker into exactly N copies of the image-placeholder token id, N being the number
of projected image tokens. Labels are -100 everywhere except on assistant replies (their text and
the end-of-turn token), so the system prompt, user turns and image positions are never learned.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm.errors import InputError

IGNORE_INDEX = -100

VQA_FOLLOWUP = "{question}\nAnswer briefly."
VQA_PROMPT = "<image>\n" + VQA_FOLLOWUP
REPORT_PROMPT = (
    "<image>\nDraft the findings section of a radiology report for this chest X-ray. "
    "Write short sentences about the lungs, pleura, heart and mediastinum."
)

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


class PromptEncoder:
    """Turns chat messages into token ids with expanded image placeholders (and labels)."""

    def __init__(self, tokenizer, image_marker: str, image_token_id: int, num_image_tokens: int, system_prompt: str):
        self.tokenizer = tokenizer
        self.image_marker = image_marker
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> Encoded:
        """Token ids and labels for a conversation.

        `messages` are {"role": "user"|"assistant"|"system", "content": str}. With
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
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise InputError(f"message role must be system, user or assistant, got {m.get('role')!r}.")
            if not isinstance(m.get("content"), str):
                raise InputError("message content must be text.")
        if messages and messages[0]["role"] == "system":
            return list(messages)
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


def vqa_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": VQA_PROMPT.format(question=question.strip())}]


def report_messages() -> list[dict]:
    return [{"role": "user", "content": REPORT_PROMPT}]


def user_message(text: str, image_marker: str, n_images: int) -> dict:
    """A user turn; one image marker per attached image is put in front if the text has none."""
    if n_images and image_marker not in text:
        text = "\n".join([image_marker] * n_images + [text])
    return {"role": "user", "content": text}
