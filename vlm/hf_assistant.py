"""The Assistant for transformers image-text-to-text models (`hf:ORG/NAME` or a local folder with a
processor): MedGemma (Gemma 3), Qwen2.5-VL and its medical fine-tunes, LLaVA-Med in llava-hf
format, SmolVLM/Idefics3, ...

The model's own processor does everything model-specific: its chat template renders the
conversation with image parts, and it expands the images into the model's image tokens. We add
what our own path has: left-padded batched decoding, the same stop strings and repetition guard
(vlm.generation.RepetitionGuard, counted over the reply only), a context check, streaming, and
one-line errors. `trust_remote_code` stays off unless the user asks for it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator

import torch

from vlm.assistant import Assistant, Capabilities
from vlm.errors import ConfigError
from vlm.generation import GenerationConfig, RepetitionGuard, check_room, cut_at_stop_string, text_deltas
from vlm.hf_lora import default_dtype, eos_ids, load_base, load_run
from vlm.prompts import prompt_style
from vlm.sources import Source


class TransformersAssistant(Assistant):
    backend = "transformers"
    capabilities = Capabilities(conversation_cache=False, batched=True, local=True)

    def __init__(self, model, processor, reference: str, prompt_style_name: str = "ours", settings: dict | None = None):
        self.model, self.processor, self.reference = model.eval(), processor, reference
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation batches: every prompt ends where its reply starts
        self.family = model.config.model_type
        self.prompts = prompt_style(prompt_style_name, self.family)
        self.settings = settings or {}

    @property
    def name(self) -> str:
        """The hub id (`hf:google/medgemma-4b-it` -> google/medgemma-4b-it) or the folder's name."""
        return self.reference[len("hf:"):] if self.reference.startswith("hf:") else Path(self.reference).name

    @classmethod
    def from_reference(cls, reference: str, device: str = "cpu", prompt_style: str = "ours", dtype: str | None = None,
                       quantization: str | None = None, device_map: str | None = None, revision: str | None = None,
                       trust_remote_code: bool = False) -> "TransformersAssistant":
        """Load processor and model. dtype: bfloat16 | float32 (default: bfloat16 on a GPU, float32
        on the CPU); quantization: none | 4bit (NF4, double quantization) | 8bit (bitsandbytes);
        device_map: e.g. "auto" to spread a large model over the GPUs (default: all on `device`).
        A LoRA run folder (vlm/hf_lora.py) loads its base as trained, unless dtype or quantization is
        given, with the adapter on it."""
        from vlm.sources import is_lora_run_folder

        if is_lora_run_folder(Path(reference)):
            if revision:
                raise ConfigError(f"--revision: {reference} loads the base revision it was trained on (its config.json).")
            model, processor, run = load_run(reference, device=device, dtype=dtype, quantization=quantization,
                                             device_map=device_map, trust_remote_code=trust_remote_code)
            settings = {"dtype": dtype or run.dtype, "quantization": quantization or run.quantization,
                        "device_map": device_map, "revision": None, "trust_remote_code": trust_remote_code,
                        "source": Source("local", str(Path(reference).resolve()), reference=reference),
                        "base_model": run.base_model, "base_revision": run.base_revision}
            return cls(model, processor, reference, prompt_style, settings)
        dtype = dtype or default_dtype(device)
        model, processor, source = load_base(reference, dtype=dtype, quantization=quantization or "none",
                                             device_map=device_map or {"": str(device)}, revision=revision,
                                             trust_remote_code=trust_remote_code, language_only=False)
        settings = {"dtype": dtype, "quantization": quantization or "none", "device_map": device_map,
                    "revision": revision, "trust_remote_code": trust_remote_code, "source": source}
        return cls(model, processor, reference, prompt_style, settings)

    # ---- conversations -> model inputs ----------------------------------------------------------

    def _render(self, messages: list[dict], n_images: int | None) -> str:
        return self.processor.apply_chat_template(self.prepare(messages, n_images), add_generation_prompt=True,
                                                  tokenize=False)

    def _inputs(self, conversations: list[list[dict]], images: list[list]):
        if len(conversations) != len(images):
            raise ConfigError("give one list of images per conversation.")
        texts = [self._render(c, len(imgs)) for c, imgs in zip(conversations, images)]
        given = [list(imgs) for imgs in images]
        # A template that writes the BOS token itself (Gemma 3's) must not get a second one from
        # the tokenizer: the rule transformers' own apply_chat_template(tokenize=True) follows.
        bos = self.tokenizer.bos_token
        special = not (bos and all(t.startswith(bos) for t in texts))
        # Nested (one list per prompt) is the shape every image-text-to-text processor takes.
        inputs = self.processor(text=texts, images=given if any(given) else None, return_tensors="pt", padding=True,
                                add_special_tokens=special)
        return inputs.to(self.model.device)

    def prompt_length(self, messages: list[dict]) -> int:
        """Tokens of the rendered prompt, each image counted as its one placeholder (for ordering)."""
        return len(self.tokenizer(self._render(messages, None), add_special_tokens=False)["input_ids"])

    def context_length(self) -> int:
        config = self.model.config
        text = getattr(config, "text_config", None) or config
        return int(getattr(text, "max_position_embeddings", None) or 4096)

    # ---- generation ---------------------------------------------------------------------------

    def _generate_kwargs(self, inputs, gen: GenerationConfig, cancelled=None) -> dict:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        prompt = inputs["input_ids"].shape[1]
        check_room(self.context_length(), prompt, gen.max_new_tokens)
        sampled = gen.temperature > 0
        if sampled and gen.seed is not None:
            torch.manual_seed(gen.seed)  # transformers samples from the global generator
        return {**inputs, "max_new_tokens": gen.max_new_tokens, "do_sample": sampled,
                "temperature": gen.temperature if sampled else None, "top_p": gen.top_p if sampled else None,
                "top_k": None, "pad_token_id": self.tokenizer.pad_token_id,
                "logits_processor": LogitsProcessorList([_ReplyGuard(gen, prompt)]),
                "stopping_criteria": StoppingCriteriaList([_StopWhen(self.tokenizer, gen.stop, prompt, cancelled)])}

    @torch.no_grad()
    def generate(self, conversations, images, gen: GenerationConfig = GenerationConfig()) -> list[str]:
        inputs = self._inputs(conversations, images)
        out = self.model.generate(**self._generate_kwargs(inputs, gen))
        replies = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at_stop_string(text, gen.stop)[0].strip() for text in replies]

    def stream(self, messages, images, gen: GenerationConfig = GenerationConfig(), session=None,
               cancelled: Callable[[], bool] | None = None) -> "TransformersStream":
        return TransformersStream(self, self._inputs([messages], [list(images)]), gen, cancelled)

    def describe(self) -> dict:
        from vlm.fileio import folder_digest

        source = self.settings.get("source")
        revision = getattr(self.model.config, "_commit_hash", None) if source is None or source.kind == "hub" \
            else folder_digest(source.location)
        template = self.processor.chat_template or ""
        adapter = {k: self.settings[k] for k in ("base_model", "base_revision") if k in self.settings}
        return {"backend": self.backend, "model": self.reference, "model_type": self.family, "revision": revision,
                **adapter, "dtype": self.settings.get("dtype"), "quantization": self.settings.get("quantization"),
                "device_map": self.settings.get("device_map"),
                "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16],
                "system_prompt": self.prompts.system or "the chat template's default"}


class TransformersStream:
    """One reply of a transformers model as text deltas: `generate` runs on a helper thread and hands
    each new token over through a queue (vlm.assistant.ReplyStream)."""

    def __init__(self, assistant: TransformersAssistant, inputs, gen: GenerationConfig, cancelled=None):
        self.assistant, self.inputs, self.gen = assistant, inputs, gen
        self.prompt_tokens = int(inputs["input_ids"].shape[1])
        self.num_tokens = 0
        self.cached_tokens = 0
        self.finish_reason: str | None = None
        self._stopped = threading.Event()
        self._outer = cancelled
        self.kwargs = assistant._generate_kwargs(inputs, gen, cancelled=self._cancelled)  # checks the context first

    def _cancelled(self) -> bool:
        return self._stopped.is_set() or bool(self._outer and self._outer())

    def __iter__(self) -> Iterator[str]:
        tokens: queue.SimpleQueue = queue.SimpleQueue()
        worker = threading.Thread(target=self._generate, args=(tokens,), name="medvlm-hf-stream", daemon=True)
        worker.start()
        tokenizer = self.assistant.tokenizer
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        try:
            yield from text_deltas(_until_done(tokens), eos_ids(self.assistant.model, tokenizer), decode,
                                   self.gen.stop, self)
        finally:
            self._stopped.set()  # a reader that left early, or a stop string: generate stops at the next step
            worker.join()

    def _generate(self, tokens: queue.SimpleQueue) -> None:
        try:
            with torch.no_grad():
                self.assistant.model.generate(**self.kwargs, streamer=_TokenQueue(tokens))
        except BaseException as e:  # surfaces in the reader's thread
            tokens.put(e)
        finally:
            tokens.put(None)


def _until_done(tokens: queue.SimpleQueue) -> Iterator[int]:
    """The token ids the generating thread hands over, until its end marker; its error re-raised here."""
    while (item := tokens.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


class _TokenQueue:
    """A transformers streamer that hands each generated token id over (the prompt comes first and is skipped)."""

    def __init__(self, tokens: queue.SimpleQueue):
        self.tokens, self.prompt_seen = tokens, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        pass


class _ReplyGuard:
    """GenerationConfig's repetition guard as a transformers logits processor, over the reply only
    (the tokens after the `prompt` first ones), exactly as medvlm's own decoding applies it."""

    def __init__(self, gen: GenerationConfig, prompt: int):
        self.guard, self.prompt = RepetitionGuard(gen, 0), prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.guard.active:
            return scores
        self.guard.replies = [row[self.prompt:].tolist() for row in input_ids]
        return self.guard(scores.float()).to(scores.dtype)


class _StopWhen:
    """A transformers stopping criterion: a row is done once its reply holds one of `stops`;
    every row is done once `cancelled()` says so."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt: int, cancelled=None):
        self.tokenizer, self.stops, self.prompt, self.cancelled = tokenizer, stops, prompt, cancelled

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.cancelled is not None and self.cancelled():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        replies = self.tokenizer.batch_decode(input_ids[:, self.prompt:], skip_special_tokens=True)
        return torch.tensor([cut_at_stop_string(r, self.stops)[1] for r in replies], device=input_ids.device)
