"""The Assistant for medvlm checkpoints (`demo`, checkpoint folders): MedVLM with the library's own
generation path (batched decoding, streaming, conversation KV caches)."""

from __future__ import annotations

from pathlib import Path

from vlm.assistant import Assistant, Capabilities
from vlm.errors import ConfigError
from vlm.fileio import folder_digest
from vlm.generation import ConversationCache, GenerationConfig, TextStream, generate
from vlm.prompts import prompt_style


class MedVLMAssistant(Assistant):
    backend = "medvlm"
    capabilities = Capabilities(conversation_cache=True, batched=True, local=True)

    def __init__(self, model, reference: str = "", prompt_style_name: str = "ours", folder: Path | None = None):
        self.model = model
        self.reference = reference or "in-memory model"
        self.folder = folder
        self.prompts = prompt_style(prompt_style_name, None)
        self.report_studies = tuple(model.config.report_studies)

    @property
    def name(self) -> str:
        return Path(self.reference).name or self.reference

    @classmethod
    def from_reference(cls, reference: str, device: str = "cpu", prompt_style: str = "ours",
                       **options) -> "MedVLMAssistant":
        """Load a checkpoint (`demo` or a folder) for inference, its LoRA adapter merged into the LLM's
        weights (faster; see MedVLM.build); options: dtype, quantization (LanguageConfig overrides)."""
        from vlm.model import MedVLM
        from vlm.sources import resolve

        unknown = set(options) - {"dtype", "quantization"}
        if unknown:
            raise ConfigError(f"{', '.join(sorted(unknown))}: not an option of medvlm checkpoints "
                              "(they take --dtype and --quantization).")
        model = MedVLM.from_pretrained(reference, device=device, merge_lora=True,
                                       **{k: v for k, v in options.items() if v is not None})
        return cls(model.eval(), reference, prompt_style, folder=Path(resolve(reference).location))

    def generate(self, conversations, images, gen: GenerationConfig = GenerationConfig()) -> list[str]:
        marked = [self.prepare(c, len(imgs)) for c, imgs in zip(conversations, images)]
        return generate(self.model, marked, images, gen)

    def stream(self, messages, images, gen: GenerationConfig = GenerationConfig(), session=None,
               cancelled=None) -> TextStream:
        return TextStream(self.model, self.prepare(messages, len(images)), images, gen, session=session,
                          cancelled=cancelled)

    def new_session(self) -> ConversationCache:
        return ConversationCache()

    def prepare(self, messages, n_images: int) -> list[dict]:
        return self.model.processor.with_markers(messages, n_images)

    def strip_markers(self, text: str) -> str:
        return self.model.processor.strip_markers(text)

    def prompt_length(self, messages) -> int:
        return len(self.model.processor.encode(self.prepare(messages, 0), add_generation_prompt=True).input_ids)

    def eval(self) -> "MedVLMAssistant":
        self.model.eval()
        return self

    def describe(self) -> dict:
        cfg = self.model.config
        return {"backend": self.backend, "model": self.reference, "model_type": "medvlm",
                "revision": folder_digest(self.folder) if self.folder else None,
                "language": cfg.language.source, "dtype": cfg.language.dtype,
                "quantization": cfg.language.quantization, "lora_rank": cfg.language.lora_r,
                "lora_merged": self.model.lora_merged, "system_prompt": cfg.system_prompt}
