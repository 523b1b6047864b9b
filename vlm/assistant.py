"""The Assistant interface: the one thing chat, the serving engine, evaluation and the benchmarks
call to get replies from a model, whatever runs it.

Three kinds sit behind `--model` (vlm.backends.load_assistant picks one):
  demo, a checkpoint folder      a medvlm checkpoint, in process (vlm.medvlm_assistant)
  hf:ORG/NAME, a folder with a   a transformers image-text-to-text model, in process
  processor                      (vlm.hf_assistant)
  openai:BASE_URL#MODEL          a model behind an OpenAI-compatible endpoint: vLLM, SGLang,
                                 Ollama, another medvlm server (vlm.openai_assistant)

Conversations are lists of {"role", "content"} messages. Content is text, in which the LLaVA
marker `<image>` (vlm.prompts.IMAGE_MARKER) stands for an attached image, or a list of parts
({"type": "text", "text": ...} / {"type": "image"}). With no marker and no image part, the
images go in front of the first user turn. Each kind turns this into what its model takes (our
processor's markers, the transformers processor's image parts, `data:` URIs): the callers never
see a model's own image tokens.

Everything an assistant does a user can cause to fail raises a MedVLMError with one readable
line: InputError for a conversation or image it cannot take, ModelSourceError for a model or an
endpoint it cannot reach.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from PIL import Image

from vlm.errors import InputError
from vlm.generation import GenerationConfig
from vlm.prompts import IMAGE_MARKER, PromptStyle


@dataclass(frozen=True)
class Capabilities:
    """What an assistant can do beyond the interface's minimum; callers ask, never guess from names."""
    conversation_cache: bool = False
    """`new_session()` returns a cache that lets a conversation's next turn skip its cached prefix."""
    batched: bool = False
    """`generate` decodes a batch in one pass (else it sends requests, concurrently where it can)."""
    local: bool = True
    """The model runs in this process (its memory and device are ours)."""


class ReplyStream(Protocol):
    """One streamed reply: iterate it for text deltas. `num_tokens` grows as they come; the other
    counts are final once iteration ends (an endpoint learns `prompt_tokens` from its last chunk;
    a local model knows it before). `finish_reason` is "stop" or "length" at the end, and may stay
    None when the reader stopped early (a cancel)."""
    prompt_tokens: int
    num_tokens: int
    cached_tokens: int
    finish_reason: str | None

    def __iter__(self) -> Iterator[str]: ...


class Assistant(ABC):
    """A model that answers conversations about images (see the module docstring)."""

    backend: str = ""
    """"medvlm", "transformers" or "openai"."""
    reference: str = ""
    """The model reference as the user gave it (`demo`, `hf:google/medgemma-4b-it`, ...)."""
    capabilities: Capabilities = Capabilities()
    prompts: PromptStyle
    """The task prompts (VQA, report) this assistant is asked with: ours, or the model card's."""
    report_studies: tuple[str, ...] = ("x-ray chest",)
    """Study types a report draft may describe (vlm.studies.reportable); others get no findings."""

    @property
    def name(self) -> str:
        """The id the API serves this model under."""
        return self.reference

    @abstractmethod
    def generate(self, conversations: list[list[dict]], images: list[list[Image.Image]],
                 gen: GenerationConfig = GenerationConfig()) -> list[str]:
        """Replies (text, stripped) to a batch of conversations, one list of images each."""

    @abstractmethod
    def stream(self, messages: list[dict], images: list[Image.Image], gen: GenerationConfig = GenerationConfig(),
               session=None, cancelled: Callable[[], bool] | None = None) -> ReplyStream:
        """One reply as text deltas. `session` is what `new_session()` gave for this conversation
        (None: nothing is reused); `cancelled()` is asked while it works and stops it early.
        A conversation the model cannot take (too long for its context...) is an InputError,
        raised here or while iterating."""

    def new_session(self):
        """A per-conversation cache when `capabilities.conversation_cache`, else None."""
        return None

    @abstractmethod
    def describe(self) -> dict:
        """What a results file records about the model: backend, model id, revision or digest
        where known, dtype, quantization, the chat template's and system prompt's identity."""

    def prompt_length(self, messages: list[dict]) -> int:
        """A size of the conversation's prompt for ordering work (tokens where the assistant can
        count them); equal conversations get equal lengths."""
        return sum(len(_text_of(m.get("content"))) for m in messages)

    def strip_markers(self, text: str) -> str:
        """`text` without image markers (a marker a user typed would count as an image)."""
        return text.replace(IMAGE_MARKER, "")

    def prepare(self, messages: list[dict], n_images: int | None) -> list[dict]:
        """Check a conversation for `n_images` images early (InputError); its normalized form.
        Idempotent: generate and stream accept what it returns."""
        return as_parts(messages, n_images)

    def eval(self) -> "Assistant":
        """Inference mode (no dropout); kept for symmetry with torch modules."""
        return self

    def usage(self) -> dict:
        """Counters worth recording next to results (e.g. an endpoint's retries); {} if none."""
        return {}

    def close(self) -> None:
        """Release what the assistant holds open (connections, worker threads)."""


def as_parts(messages: list[dict], n_images: int | None) -> list[dict]:
    """`messages` with list-of-parts content: `<image>` markers in text become image parts, and
    `n_images` image parts go in front of the first user turn when none is given. InputError when
    the image parts are not exactly `n_images` (None: as many as the conversation has) or a
    message is malformed."""
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else None
            raise InputError(f"message role must be system, user or assistant, got {role!r}.")
        out.append({"role": m["role"], "content": _parts(m.get("content"))})
    count = sum(p["type"] == "image" for m in out for p in m["content"])
    if n_images is None:
        return out
    if count == 0 and n_images:
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise InputError("a conversation with images needs a user turn.")
        first["content"] = [{"type": "image"}] * n_images + first["content"]
        count = n_images
    if count != n_images:
        raise InputError(f"the conversation has {count} image places but {n_images} images; "
                         "it needs one per image.")
    return out


def _parts(content) -> list[dict]:
    if isinstance(content, str):
        pieces = content.split(IMAGE_MARKER)
        parts: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                parts.append({"type": "image"})
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
        return parts
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                text = part["text"].replace(IMAGE_MARKER, "")
                if text.strip():
                    parts.append({"type": "text", "text": text})
            else:
                raise InputError("a content part must be {'type': 'text', 'text': ...} or {'type': 'image'}.")
        return parts
    raise InputError("message content must be text or a list of parts.")


def _text_of(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")
