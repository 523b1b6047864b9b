"""The Assistant for models behind OpenAI-compatible chat endpoints (vLLM, SGLang, Ollama, another
`medvlm serve`): `openai:BASE_URL#MODEL`, e.g. `openai:http://127.0.0.1:8000/v1#demo`.

Construction asks GET BASE_URL/models, so a wrong address, key or model id fails at once, in one
line. Each conversation is one POST /chat/completions with its images as PNG `data:` URLs
(lossless). Every request carries `repetition_penalty` and `no_repeat_ngram_size`: medvlm's server
applies its chat repetition guard when they are absent, and evaluation needs plain greedy
decoding (vLLM takes `repetition_penalty`; servers ignore fields they do not know). HTTP 429 and
500/502/503/504, lost connections and timeouts are retried with exponential backoff, honouring
Retry-After; `usage()` counts the retries by cause. The API key ($OPENAI_API_KEY or the variable
`api_key_env` names) travels only in the Authorization header, never in a message or describe().
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image

from vlm.assistant import Assistant, Capabilities
from vlm.errors import ConfigError, InputError, ModelSourceError
from vlm.generation import GenerationConfig, _held_back, cut_at_stop_string
from vlm.prompts import prompt_style as style_named

RETRY_STATUSES = (429, 500, 502, 503, 504)
# Refused or lost connections, timeouts, a server gone mid-answer (not our own protocol mistakes).
RETRIED_ERRORS = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)
RETRY_CAUSES = ("429", "5xx", "connection", "timeout")
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 30.0  # a server asking for longer is unlikely to be back within our retries anyway
CARD_FIELDS = ("id", "owned_by", "root", "parent", "revision", "created", "max_model_len")


class OpenAIAssistant(Assistant):
    backend = "openai"
    capabilities = Capabilities(conversation_cache=False, batched=False, local=False)

    def __init__(self, reference: str, base_url: str, model: str, client: httpx.Client, prompt_style: str = "ours",
                 concurrency: int = 4, max_retries: int = 5, backoff: float = 0.5):
        self.reference, self.base_url, self.model, self.client = reference, base_url, model, client
        self.endpoint = public_url(base_url)
        self.prompts = style_named(prompt_style, None)  # an endpoint does not tell its model's family
        self.concurrency, self.max_retries, self.backoff = concurrency, max_retries, backoff
        self.card: dict = {}
        self.system_fingerprint: str | None = None
        self._lock = threading.Lock()  # generate's worker threads count into the same counters
        self._requests, self._retries = 0, Counter()

    @classmethod
    def from_reference(cls, reference: str, prompt_style: str = "ours", api_key_env: str | None = None,
                       concurrency: int = 4, timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5,
                       **unknown) -> "OpenAIAssistant":
        """Connect to `openai:BASE_URL#MODEL` and check that the endpoint serves MODEL. `backoff`:
        seconds before the first retry, doubling up to MAX_BACKOFF_S."""
        if unknown:
            raise ConfigError(f"{', '.join(sorted(unknown))}: not an option of openai: endpoints "
                              "(they take api_key_env, concurrency, timeout and max_retries).")
        if concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ConfigError("an openai: endpoint needs concurrency >= 1, timeout > 0, max_retries >= 0, backoff >= 0.")
        base_url, model = parse_reference(reference)
        key = api_key(api_key_env)
        # One connection per request in flight; connecting gets a shorter limit than answering.
        client = httpx.Client(headers={"Authorization": f"Bearer {key}"} if key else {},
                              timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
                              limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        try:
            assistant = cls(reference, base_url, model, client, prompt_style, concurrency, max_retries, backoff)
            assistant.card = assistant._served_card(api_key_env or "OPENAI_API_KEY")
        except BaseException:
            client.close()
            raise
        return assistant

    @property
    def name(self) -> str:
        return self.model

    def _served_card(self, key_variable: str) -> dict:
        """MODEL's entry in GET /models (one attempt: a wrong address should fail fast)."""
        where = f"openai endpoint {self.endpoint}"
        try:
            response = self.client.get(self.base_url + "/models")
        except httpx.TransportError as e:
            raise ModelSourceError(f"{where}: unreachable ({transport_failure(e)[1]}); is the server running?") from None
        if response.status_code in (401, 403):
            raise ModelSourceError(f"{where}: the server refused the API key (HTTP {response.status_code}); "
                                   f"set {key_variable} to a key it accepts.")
        if response.status_code != 200:
            raise ModelSourceError(f"{where}: GET /models answered HTTP {response.status_code} "
                                   f"({error_message(response)}); is it the API root (e.g. http://HOST:8000/v1)?")
        try:
            cards = [c for c in response.json()["data"] if isinstance(c, dict)]
        except (ValueError, KeyError, TypeError):
            raise ModelSourceError(f"{where}: GET /models is not an OpenAI model list; "
                                   "is it an OpenAI-compatible API?") from None
        card = next((c for c in cards if c.get("id") == self.model), None)
        if card is None:
            served = ", ".join(str(c.get("id")) for c in cards) or "none"
            raise ModelSourceError(f"{where} serves no model {self.model!r}; served: {served}.")
        return {k: card[k] for k in CARD_FIELDS if isinstance(card.get(k), (str, int, float))}

    # ---- requests ------------------------------------------------------------------------------

    def prepare(self, messages: list[dict], n_images: int | None) -> list[dict]:
        prepared = super().prepare(messages, n_images)
        if any(p["type"] == "image" for m in prepared if m["role"] != "user" for p in m["content"]):
            raise InputError("an image outside a user turn: OpenAI-compatible endpoints take images in user turns.")
        return prepared

    def generate(self, conversations, images, gen: GenerationConfig = GenerationConfig()) -> list[str]:
        # Every conversation is checked before the first request: a bad one costs no calls.
        asked = [(self.prepare(c, len(imgs)), imgs) for c, imgs in zip(conversations, images)]
        if len(asked) <= 1:
            return [self._complete(messages, imgs, gen) for messages, imgs in asked]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(asked)), thread_name_prefix="openai")
        try:
            futures = [pool.submit(self._complete, messages, imgs, gen) for messages, imgs in asked]
            return [f.result() for f in futures]
        finally:  # after a failure, the requests not yet sent are not sent
            pool.shutdown(wait=True, cancel_futures=True)

    def _complete(self, messages: list[dict], images: list[Image.Image], gen: GenerationConfig) -> str:
        # Images are encoded here, in the worker: only the requests in flight hold their data: URLs.
        response = self._send(self._body(messages, images, gen), stream=False)
        try:
            answer = response.json()
            content = answer["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise ModelSourceError(f"openai endpoint {self.endpoint}: the answer is not a chat completion.") from None
        self._note_fingerprint(answer)
        return cut_at_stop_string(str(content), gen.stop)[0].strip()  # some servers leave the stop text in

    def stream(self, messages, images, gen: GenerationConfig = GenerationConfig(), session=None,
               cancelled: Callable[[], bool] | None = None) -> "EndpointStream":
        body = {**self._body(self.prepare(messages, len(images)), images, gen), "stream": True,
                "stream_options": {"include_usage": True}}
        return EndpointStream(self, body, gen.stop, cancelled)

    def _body(self, messages: list[dict], images: list[Image.Image], gen: GenerationConfig) -> dict:
        body = {"model": self.model, "messages": chat_messages(messages, images), "max_tokens": gen.max_new_tokens,
                "temperature": gen.temperature, "top_p": gen.top_p,
                "repetition_penalty": gen.repetition_penalty, "no_repeat_ngram_size": gen.no_repeat_ngram_size}
        if gen.seed is not None:
            body["seed"] = gen.seed
        if gen.stop:
            body["stop"] = list(gen.stop)
        return body

    def _send(self, body: dict, stream: bool, attempt: int = 0) -> httpx.Response:
        """POST /chat/completions until a 200 (its body read unless `stream`), retrying what is
        worth waiting out; `attempt`: retries this request has already spent."""
        if attempt == 0:
            with self._lock:
                self._requests += 1
        while True:
            response = None
            try:
                request = self.client.build_request("POST", self.base_url + "/chat/completions", json=body)
                response = self.client.send(request, stream=True)
                if response.status_code == 200 and stream:
                    return response
                response.read()  # the whole answer, or the error text
                if response.status_code == 200:
                    return response
            except RETRIED_ERRORS as e:
                if response is not None:
                    response.close()
                attempt = self._retry(attempt, *transport_failure(e))
                continue
            status = response.status_code
            if status not in RETRY_STATUSES:
                raise self._refusal(response)
            attempt = self._retry(attempt, "429" if status == 429 else "5xx",
                                  f"HTTP {status}: {error_message(response)}", retry_after(response))

    def _retry(self, attempt: int, cause: str, reason: str, wait: float | None = None) -> int:
        """Wait before retry number `attempt` + 1, or a ModelSourceError when none is left."""
        if attempt >= self.max_retries:
            raise ModelSourceError(f"openai endpoint {self.endpoint}: no answer after {self.max_retries} "
                                   f"{'retry' if self.max_retries == 1 else 'retries'} ({reason}).")
        with self._lock:
            self._retries[cause] += 1
        time.sleep(wait if wait is not None else min(self.backoff * 2 ** attempt, MAX_BACKOFF_S))
        return attempt + 1

    def _refusal(self, response: httpx.Response) -> Exception:
        status, message, where = response.status_code, error_message(response), f"openai endpoint {self.endpoint}"
        if status in (400, 413, 422):  # the request itself cannot be taken: too long, a bad image...
            return InputError(f"{where} refused the request (HTTP {status}): {message}")
        if status in (401, 403):
            return ModelSourceError(f"{where}: the server refused the API key (HTTP {status}).")
        return ModelSourceError(f"{where}: HTTP {status} ({message}).")

    def _note_fingerprint(self, answer) -> None:
        if isinstance(answer, dict) and isinstance(answer.get("system_fingerprint"), str):
            self.system_fingerprint = answer["system_fingerprint"]

    # ---- what results record -------------------------------------------------------------------

    def usage(self) -> dict:
        """Chat requests made (one per conversation asked) and the retries they took, by cause."""
        with self._lock:
            return {"requests": self._requests, "retries": {c: self._retries[c] for c in RETRY_CAUSES}}

    def describe(self) -> dict:
        return {"backend": self.backend, "model": f"openai:{self.endpoint}#{self.model}", "endpoint": self.endpoint,
                "served_model": self.model, "revision": self.card.get("root") or self.card.get("revision"),
                "card": dict(self.card), "system_fingerprint": self.system_fingerprint}

    def close(self) -> None:
        self.client.close()


class EndpointStream:
    """One streamed reply (vlm.assistant.ReplyStream) read from the endpoint's server-sent events.

    Text that could be the start of a stop string is held back until it is not, as
    vlm.generation.TextStream does, since a server may send the stop text. A request is retried
    only until its first delta is shown: after that a retry would repeat text."""

    def __init__(self, owner: OpenAIAssistant, body: dict, stops: tuple[str, ...], cancelled=None):
        self.owner, self.body, self.stops, self.cancelled = owner, body, stops, cancelled
        self.prompt_tokens = self.num_tokens = self.cached_tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        attempt, shown = 0, False
        while True:
            response = self.owner._send(self.body, stream=True, attempt=attempt)
            try:
                for delta in self._deltas(response):
                    shown = True
                    yield delta
                return
            except RETRIED_ERRORS as e:
                if shown:
                    raise ModelSourceError(f"openai endpoint {self.owner.endpoint}: the reply broke off "
                                           f"({transport_failure(e)[1]}).") from None
                attempt = self.owner._retry(attempt, *transport_failure(e))
            finally:
                response.close()  # also when the reader stops early: the server then stops generating

    def _deltas(self, response: httpx.Response) -> Iterator[str]:
        raw, shown = "", ""
        self.num_tokens, self.finish_reason = 0, None
        for chunk in sse_events(response, self.owner.endpoint):
            if self.cancelled is not None and self.cancelled():
                return
            self._note(chunk)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                raw += piece
                self.num_tokens += bool(piece)  # a usage chunk, when one comes, has the true count
                if choice.get("finish_reason"):
                    self.finish_reason = "length" if choice["finish_reason"] == "length" else "stop"
            text, hit = cut_at_stop_string(raw, self.stops)
            ready = text if hit else text[:len(text) - _held_back(text, self.stops)]
            if len(ready) > len(shown):
                delta, shown = ready[len(shown):], ready
                yield delta
            if hit:
                self.finish_reason = "stop"
                return
        if rest := cut_at_stop_string(raw, self.stops)[0][len(shown):]:
            yield rest  # held back for a stop string that never came
        self.finish_reason = self.finish_reason or "stop"

    def _note(self, chunk: dict) -> None:
        if isinstance(chunk.get("error"), dict):  # the server failed after sending its headers
            kind = InputError if chunk["error"].get("type") == "invalid_request_error" else ModelSourceError
            raise kind(f"openai endpoint {self.owner.endpoint}: {one_line(str(chunk['error'].get('message')))}")
        if isinstance(usage := chunk.get("usage"), dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.num_tokens = int(usage.get("completion_tokens") or self.num_tokens)
        self.owner._note_fingerprint(chunk)


def sse_events(response: httpx.Response, endpoint: str) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream's `data:` lines, up to `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # ": keep-alive" comments, event:/id:/retry: fields, blank separators
        payload = line[5:].removeprefix(" ")
        if payload.strip() == "[DONE]":
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ModelSourceError(f"openai endpoint {endpoint}: a streamed chunk is not JSON.") from None
        if isinstance(chunk, dict):
            yield chunk


# ---- references, messages, errors ----------------------------------------------------------------

def parse_reference(reference: str) -> tuple[str, str]:
    """`openai:BASE_URL#MODEL` -> (BASE_URL without a trailing slash, MODEL), or a ConfigError."""
    url, _, model = (reference or "").strip().removeprefix("openai:").partition("#")
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, a broken IPv6 literal
        valid = False
    example = "e.g. openai:http://127.0.0.1:8000/v1#MODEL"
    if not valid:
        raise ConfigError(f"--model openai:{public_url(url)}: give an http(s) URL of the API, {example}.")
    if not model.strip():
        raise ConfigError(f"--model openai:{public_url(url)}: name the served model after '#', {example}.")
    return url.rstrip("/"), model.strip()


def api_key(env_name: str | None) -> str | None:
    """The key in $`env_name` (which must be set), else $OPENAI_API_KEY if set (local servers need none)."""
    if env_name is not None and not os.environ.get(env_name):
        raise ConfigError(f"--api-key-env {env_name}: that environment variable is not set.")
    return os.environ.get(env_name or "OPENAI_API_KEY") or None


def public_url(url: str) -> str:
    """`url` without user:password@ and query, which may hold credentials."""
    try:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", "")).rstrip("/")
    except ValueError:
        return "(an unparsable URL)"


def chat_messages(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """Prepared messages -> OpenAI chat messages, the images as PNG data: URLs in order."""
    pending = iter(images)
    out = []
    for m in messages:
        parts = [{"type": "image_url", "image_url": {"url": png_data_url(next(pending))}} if p["type"] == "image"
                 else {"type": "text", "text": p["text"]} for p in m["content"]]
        plain = len(parts) <= 1 and all(p["type"] == "text" for p in parts)
        out.append({"role": m["role"], "content": "".join(p["text"] for p in parts) if plain else parts})
    return out


def png_data_url(image: Image.Image) -> str:
    # PNG is lossless; L and RGB go as they are, other modes as RGB (what every server decodes).
    image = image if image.mode in ("L", "RGB") else image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def error_message(response: httpx.Response) -> str:
    """The server's error text: OpenAI's {"error": {"message"}}, vLLM's {"message"}, FastAPI's {"detail"}."""
    try:
        body = response.json()
        error = body.get("error")
        text = error.get("message") if isinstance(error, dict) else error or body.get("message") or body.get("detail")
    except (ValueError, AttributeError):
        text = None
    return one_line(str(text or response.text or response.reason_phrase))


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (capped); None when absent or an HTTP date (then our own backoff)."""
    try:
        return min(max(float(response.headers.get("retry-after", "")), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


def transport_failure(error: httpx.TransportError) -> tuple[str, str]:
    """The retry cause ("timeout" or "connection") and a few words for a failed connection (the
    exception's own text can be a long errno string)."""
    text = str(error).lower()
    if isinstance(error, httpx.TimeoutException):
        return "timeout", f"no {'connection' if isinstance(error, httpx.ConnectTimeout) else 'answer'} within the timeout"
    if "refused" in text:
        return "connection", "connection refused"
    if "name or service" in text or "nodename" in text or "getaddrinfo" in text:
        return "connection", "host not found"
    if isinstance(error, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "connection", "connection lost"
    return "connection", one_line(str(error), 120) or type(error).__name__
