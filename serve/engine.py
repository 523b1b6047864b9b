"""One assistant (vlm.assistant: a medvlm checkpoint, a transformers model or an OpenAI-compatible
endpoint) behind a bounded request queue, shared by the Gradio app and the HTTP API.

Concurrency: generation runs on `concurrency` worker threads (default 1). A conversation's KV
cache is mutated in place while it decodes, and on one GPU parallel decodes mostly compete for
the same device, so one at a time is the safe default; more workers only help on hardware with
idle capacity. Requests beyond the running ones wait in a queue of at most `queue_size`; one
more is refused at once with `EngineBusy` ("busy, try again"), which the API maps to HTTP 503.

Each request gets a `Reply`: the worker pushes text deltas into it and the caller reads them
(sync or async). Cancelling a reply (Stop button, client gone) stops the worker at the next
token, so an abandoned request never holds the model.

Conversations are keyed by an id chosen by the caller (one browser session, one API client's
named conversation: never by content, so no client's cache serves another) and hold their
images and, where the assistant keeps one (`capabilities.conversation_cache`), a session cache,
so a follow-up turn neither re-encodes the image nor recomputes its prefix. The least recently used ones are dropped beyond `max_conversations`, and
their KV caches are dropped, oldest first, beyond `max_cache_bytes` in all. A request with no
conversation id is a one-off: nothing is cached or kept.

Uploads may be handed over as raw bytes: they are decoded by the worker, after the request was
admitted to the queue, so a flood of large images waits (or is refused) before it costs memory.

Logs carry ids, sizes, token counts and timings only: never message text, images or DICOM tags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

from PIL import Image

from vlm import studies
from vlm.errors import InputError, MedVLMError
from vlm.assistant import ReplyStream
from vlm.backends import as_assistant
from vlm.generation import GenerationConfig, cache_bytes
from vlm.imaging import MedicalImage, load_image

log = logging.getLogger(__name__)

_END = object()
# "Impression:", "IMPRESSION", "## Impression", "**Impression:**" at the start of a line.
_IMPRESSION = re.compile(r"^[ \t]*(?:#+[ \t]*)?\**[ \t]*impressions?[ \t]*:?[ \t]*\**[ \t]*:?", re.I | re.M)
_FINDINGS = re.compile(r"^\s*(?:#+[ \t]*)?\**[ \t]*findings[ \t]*:?[ \t]*\**[ \t]*:?", re.I)


class EngineBusy(MedVLMError):
    """The request queue is full; the caller should try again shortly."""


MIN_REPORT_SIDE = 64
"""A smaller image holds too little to report on; drafting refuses it."""


@dataclass
class Conversation:
    images: list[Image.Image] = field(default_factory=list)
    cache: object = None
    """The assistant's session cache (Assistant.new_session); None: nothing is reused or kept."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while the conversation decodes: its cache is not safe to share between two decodes."""
    active: "Reply | None" = None


class Reply:
    """One streamed reply. Iterate it (or `async for` over `astream()`) to get the text deltas.

    After the end: `finish_reason` ("stop", "length" or "cancelled"), `prompt_tokens`,
    `cached_tokens` (prompt tokens served from the conversation's cache) and `completion_tokens`.
    Leaving the loop early, or `cancel()`, stops the generation at the next token.
    """

    def __init__(self, max_new_tokens: int):
        self.max_new_tokens = max_new_tokens
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._items.get()) is not _END:
                yield self._unwrap(item)
        finally:
            self.cancel()  # a no-op after the end; stops the worker if the reader left early

    async def astream(self) -> AsyncIterator[str]:
        """Async deltas without a thread per reader: the worker wakes this loop when it pushes."""
        event = asyncio.Event()
        self._waker = (asyncio.get_running_loop(), event)
        try:
            while True:
                try:
                    item = self._items.get_nowait()
                except queue.Empty:
                    event.clear()
                    if self._items.empty():  # re-check after clear: a push may have come between
                        await event.wait()
                    continue
                if item is _END:
                    return
                yield self._unwrap(item)
        finally:
            self.cancel()

    async def atext(self) -> str:
        return "".join([piece async for piece in self.astream()])

    def text(self) -> str:
        return "".join(self)

    @staticmethod
    def _unwrap(item):
        if isinstance(item, BaseException):
            raise item
        return item

    def _push(self, item) -> None:
        self._items.put(item)
        waker = self._waker
        if waker is not None:
            with contextlib.suppress(RuntimeError):  # the reader's loop has closed: nobody is listening
                waker[0].call_soon_threadsafe(waker[1].set)


class Engine:
    """One loaded model, its request queue and its conversations (see the module docstring)."""

    def __init__(self, assistant, concurrency: int = 1, queue_size: int = 16, max_image_bytes: int = 64 * 2**20,
                 max_image_pixels: int = 50_000_000, max_conversations: int = 64, max_cache_bytes: int = 2 * 2**30,
                 name: str = "medvlm"):
        """`assistant`: a vlm.assistant.Assistant (a MedVLM is wrapped); `name`: the id the API serves."""
        if concurrency < 1 or queue_size < 0 or max_conversations < 1 or max_cache_bytes < 0:
            raise ValueError("concurrency and max_conversations must be >= 1, queue_size and max_cache_bytes >= 0")
        self.assistant = as_assistant(assistant, name)
        self.name = name
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_conversations = max_conversations
        self.max_cache_bytes = max_cache_bytes
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="medvlm-generate")
        self._lock = threading.Lock()  # guards _pending and _conversations
        self._pending = 0
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()

    # ---- images ---------------------------------------------------------------------------------

    def load_image(self, source, window=None, frame: int | None = None) -> MedicalImage:
        """Decode an upload (path or bytes) with this server's byte and pixel limits; InputError if unusable."""
        start = time.perf_counter()
        image = load_image(source, window=window, frame=frame, max_pixels=self.max_image_pixels,
                           max_bytes=self.max_image_bytes)
        h, w = image.pixels.shape[:2]
        log.info("decoded an image: %dx%d, %d frame(s), %.0f ms", w, h, image.num_frames,
                 1000 * (time.perf_counter() - start))
        return image

    def set_images(self, conversation_id: str, images: list[Image.Image]) -> None:
        """Attach images to a conversation (its following turns use them)."""
        self._conversation(conversation_id).images = list(images)

    def images(self, conversation_id: str) -> list[Image.Image]:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
        return list(conversation.images) if conversation else []

    def forget(self, conversation_id: str) -> None:
        """Drop a conversation's images and cache (e.g. the user cleared the chat)."""
        self.cancel(conversation_id)
        with self._lock:
            self._conversations.pop(conversation_id, None)

    def cancel(self, conversation_id: str) -> None:
        with self._lock:
            conversation = self._conversations.get(conversation_id)
        if conversation is not None and conversation.active is not None:
            conversation.active.cancel()

    # ---- generation -----------------------------------------------------------------------------

    def chat(self, conversation_id: str | None, messages: list[dict],
             images: list[Image.Image | bytes] | None = None, gen: GenerationConfig | None = None) -> Reply:
        """Queue a reply to `messages` (role/content dicts; content is text with one image marker
        per image, or a list of text and image parts; the processor puts the markers in front of
        the first user turn when there are none: vlm.processor.Processor.with_markers). `images`
        (PIL images, or upload bytes that the worker decodes once the request is admitted)
        replaces the conversation's images; None keeps those it has. `conversation_id=None` is a
        one-off conversation. Raises EngineBusy at once when the queue is full; errors during
        decoding or generation (e.g. InputError) surface while reading."""
        gen = gen or GenerationConfig()
        conversation = self._conversation(conversation_id) if conversation_id is not None else Conversation()
        pending = list(conversation.images) if images is None else list(images)
        messages = self.assistant.prepare(messages, len(pending))
        reply = Reply(gen.max_new_tokens)
        with self._lock:
            if self._pending >= self.concurrency + self.queue_size:
                raise EngineBusy(f"The server is busy ({self._pending} requests running or waiting); "
                                 "please try again in a moment.")
            self._pending += 1
        try:
            self._pool.submit(self._run, conversation_id or "one-off", conversation, messages,
                              None if images is None else pending, gen, reply)
        except RuntimeError:  # the pool was shut down
            self._release()
            raise EngineBusy("The server is shutting down.") from None
        return reply

    def draft_report(self, image: MedicalImage | Image.Image, gen: GenerationConfig | None = None,
                     metadata: dict | None = None) -> dict[str, str]:
        """Draft {"study", "findings", "impression"} for one image.

        The study (modality, region) comes from the DICOM header (`metadata`, or a MedicalImage's
        own), else from the model's answers. Findings are drafted with REPORT_PROMPT only for the
        study types the model was trained to report (`config.report_studies`); otherwise the draft
        says so. Without an "Impression" heading in the draft, the impression is derived from its
        positive findings (vlm.studies.impression_from_findings). Every model call is a one-off
        conversation: a draft leaves nothing behind in the engine."""
        gen = (gen or GenerationConfig(max_new_tokens=256)).guarded()
        pil = image.to_pil() if isinstance(image, MedicalImage) else image
        if min(pil.size) < MIN_REPORT_SIDE:
            raise InputError(f"The image is {pil.size[0]}x{pil.size[1]} pixels: too small to report on "
                             f"(at least {MIN_REPORT_SIDE} pixels a side).")
        if metadata is None:
            metadata = image.metadata if isinstance(image, MedicalImage) else {}
        study = studies.study_from_metadata(metadata) or self._ask_study(pil)
        allowed = tuple(self.assistant.report_studies)
        if not studies.reportable(study, allowed):
            return {"study": study.describe(), "findings": studies.not_reportable_note(study, allowed),
                    "impression": "No draft: this study type is outside what the model was trained to report."}
        report = split_report(self.chat(None, self.assistant.prompts.report_messages(), [pil], gen).text())
        report["impression"] = report["impression"] or studies.impression_from_findings(report["findings"])
        return {"study": study.describe(), **report}

    def _ask_study(self, image: Image.Image) -> studies.Study:
        """The study as the model names it (greedy, short answers, one-off conversations)."""
        gen = GenerationConfig(max_new_tokens=16)
        modality, region = (self.chat(None, self.assistant.prompts.vqa_messages(q), [image], gen).text()
                            for q in (studies.MODALITY_QUESTION, studies.REGION_QUESTION))
        return studies.study_from_answers(modality, region)

    def close(self) -> None:
        with self._lock:
            for conversation in self._conversations.values():
                if conversation.active is not None:
                    conversation.active.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def pending(self) -> int:
        """Requests running or waiting."""
        with self._lock:
            return self._pending

    def _conversation(self, conversation_id: str) -> Conversation:
        with self._lock:
            conversation = self._conversations.pop(conversation_id, None) or \
                Conversation(cache=self.assistant.new_session())
            self._conversations[conversation_id] = conversation  # most recently used last
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)  # a running decode keeps its own reference
            return conversation

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _stream(self, conversation: Conversation, messages: list[dict], images: list[Image.Image],
                gen: GenerationConfig, cancelled=None) -> ReplyStream:
        """The assistant's reply stream (a seam: tests substitute a slow fake here)."""
        return self.assistant.stream(messages, images, gen, session=conversation.cache, cancelled=cancelled)

    def _run(self, conversation_id: str, conversation: Conversation, messages, images, gen, reply: Reply) -> None:
        """Worker: decode into `reply` until the end, the budget or a cancel; always end the reply."""
        start = time.perf_counter()
        try:
            if reply.cancelled:  # given up while it waited in the queue
                reply.finish_reason = "cancelled"
                return
            with conversation.lock:
                conversation.active = reply
                try:
                    if images is not None:  # new images (uploads decoded here, after admission)
                        conversation.images = [self._decoded(item) for item in images]
                    self._decode(conversation, messages, list(conversation.images), gen, reply)
                finally:
                    conversation.active = None
        except MedVLMError as e:
            reply.finish_reason = "error"
            reply._push(e)
        except Exception as e:  # a bug: full details in the server log, a plain message to the user
            log.exception("generation failed in conversation %s", conversation_id[:16])
            reply.finish_reason = "error"
            reply._push(RuntimeError(f"Internal error while generating ({type(e).__name__}); see the server log."))
        finally:
            self._release()
            self._trim_caches()
            end = time.perf_counter()
            log.info("conversation %s: %s; %d prompt tokens (%d cached), %d generated; first token %.2f s, "
                     "total %.2f s", conversation_id[:16], reply.finish_reason, reply.prompt_tokens,
                     reply.cached_tokens, reply.completion_tokens, (reply.first_token_at or end) - start, end - start)
            reply._push(_END)  # last: a reader that sees the end finds the work (and its log line) done

    def _decoded(self, item: Image.Image | bytes) -> Image.Image:
        return self.load_image(item).to_pil() if isinstance(item, (bytes, bytearray)) else item

    def _decode(self, conversation: Conversation, messages, images, gen: GenerationConfig, reply: Reply) -> None:
        stream = self._stream(conversation, messages, images, gen, cancelled=lambda: reply.cancelled)
        reply.prompt_tokens = stream.prompt_tokens
        for delta in stream:
            reply.cached_tokens = stream.cached_tokens
            reply.first_token_at = reply.first_token_at or time.perf_counter()
            reply.completion_tokens = stream.num_tokens
            reply._push(delta)
            if reply.cancelled:
                break
        # Read the counts again: an endpoint's stream learns them only from its last chunk.
        reply.prompt_tokens, reply.completion_tokens = stream.prompt_tokens, stream.num_tokens
        reply.cached_tokens = stream.cached_tokens
        reply.finish_reason = "cancelled" if reply.cancelled else (stream.finish_reason or "stop")

    def cache_bytes(self) -> int:
        """Bytes held by the conversations' KV caches."""
        with self._lock:
            conversations = list(self._conversations.values())
        return sum(_session_bytes(c.cache) for c in conversations)

    def _trim_caches(self) -> None:
        """Drop KV caches, least recently used first, until they hold at most max_cache_bytes
        (a conversation decoding right now keeps its cache; its images stay either way)."""
        with self._lock:
            conversations = list(self._conversations.values())  # oldest first
        sizes = [_session_bytes(c.cache) for c in conversations]
        total = sum(sizes)
        for conversation, size in zip(conversations, sizes):
            if total <= self.max_cache_bytes:
                return
            if size and conversation.lock.acquire(blocking=False):
                try:
                    conversation.cache = self.assistant.new_session()
                finally:
                    conversation.lock.release()
                total -= size


def _session_bytes(session) -> int:
    """Bytes of KV cache a session holds (0 for none, or an assistant that keeps no tensors here)."""
    return cache_bytes(getattr(session, "past", None))


def split_report(text: str) -> dict[str, str]:
    """Split a drafted report at its "Impression" heading; without one, all of it is findings."""
    match = _IMPRESSION.search(text)
    findings, impression = (text[:match.start()], text[match.end():]) if match else (text, "")
    findings = _FINDINGS.sub("", findings, count=1)
    return {"findings": findings.strip(), "impression": impression.strip()}
