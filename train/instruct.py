"""Stage 2b, instruction tuning (LLaVA-Med stage 2): conversations, the projector and a LoRA
adapter train (QLoRA when the LLM is 4-bit); the vision tower too when model.vision.trainable."""

from __future__ import annotations

from train.vlm_stage import VLMStage
from vlm.errors import ConfigError
from vlm.language import attach_lora


class InstructStage(VLMStage):
    name = "instruct"

    def configure(self, model):
        if not hasattr(model.llm, "peft_config"):
            if model.config.language.lora_r <= 0:
                raise ConfigError("instruct trains a LoRA adapter: set model.language.lora_r "
                                  "(e.g. --model.language.lora-r 16).")
            model.llm = attach_lora(model.llm, model.config.language)
        model.requires_grad_(False)
        for name, param in model.llm.named_parameters():
            param.requires_grad_("lora_" in name)
        model.projector.requires_grad_(True)
        if model.config.vision.trainable:
            model.vision.requires_grad_(True)
        return model

    def _load(self, path: str):
        return self._conversations(path)
