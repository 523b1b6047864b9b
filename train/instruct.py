"""Stage 2b, instruction tuning (LLaVA-Med stage 2): conversations, the projector and a LoRA
adapter train (QLoRA when the LLM is 4-bit); the vision tower optionally too."""

from __future__ import annotations

from train.vlm_stage import VLMStage
from vlm.errors import ConfigError
from vlm.language import attach_lora


class InstructStage(VLMStage):
    name = "instruct"

    def configure(self, model):
        if not hasattr(model.llm, "peft_config"):
            rank = self.cfg.lora_r or model.config.language.lora_r
            if rank <= 0:
                raise ConfigError("instruct trains a LoRA adapter: set lora_r (e.g. --lora-r 16).")
            model.config = model.config.replace(language={"lora_r": rank})
            model.llm = attach_lora(model.llm, model.config.language)
        model.requires_grad_(False)
        for name, param in model.llm.named_parameters():
            param.requires_grad_("lora_" in name)
        model.projector.requires_grad_(True)
        if self.cfg.train_vision:
            model.config = model.config.replace(vision={"trainable": True})
            model.vision.requires_grad_(True)
        return model

    def _load(self, path: str):
        return self._conversations(path)
