"""MedVLM: encode images -> project -> scatter into the LLM's input embeddings -> LM.

The image features replace the placeholder positions of the prompt with `masked_scatter`
(transformers' LLaVA convention); the number of placeholder positions must equal the number of
image feature vectors, or a clear error is raised. Nothing splices sequences by hand.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vlm import checkpoint
from vlm.config import MedVLMConfig
from vlm.errors import CheckpointError, InputError
from vlm.language import attach_lora, load_language_model
from vlm.projector import Projector
from vlm.processor import IGNORE_INDEX, Processor
from vlm.vision import VisionTower, load_vision_tower


def lora_merge_applies(config: MedVLMConfig, lora_trainable: bool) -> bool:
    """Whether a load with merge_lora merges the saved adapter: only for inference (not
    `lora_trainable`) and unquantized weights (merging into 8/4-bit weights would re-quantize them
    and change the answers)."""
    return not lora_trainable and config.language.quantization == "none"


class MedVLM(nn.Module):
    def __init__(self, config: MedVLMConfig, vision: VisionTower, projector: Projector, llm: nn.Module, tokenizer,
                 lora_merged: bool = False):
        super().__init__()
        self.config = config
        self.lora_merged = lora_merged
        """The saved LoRA adapter was merged into the LLM's weights at load time (an inference-only
        model: nothing to train or save; config.language.lora_r still says the adapter's rank)."""
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        # The placeholder is a token the tokenizer knows but the embedding table need not have:
        # its positions are overwritten by image features, so they are looked up as id 0.
        tokenizer.add_tokens([config.image_marker], special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_marker)
        self.processor = Processor(tokenizer, vision, config.image_marker, self.image_token_id,
                                   projector.num_output_tokens(), config.system_prompt, device=lambda: self.device)

    @classmethod
    def build(cls, config: MedVLMConfig, device: str | torch.device = "cpu", adapter_dir: str | Path | None = None,
              lora_trainable: bool = False, merge_lora: bool = False) -> "MedVLM":
        """Load the frozen bases named in `config`, a fresh projector, and LoRA (saved or fresh).

        `merge_lora` (inference loads): fold the saved adapter into the LLM's weights, so each
        projection is one matmul instead of base + B @ A (docs/benchmarks.md, "LoRA merged or
        separate"); see `lora_merge_applies` for when it happens."""
        config.validate()
        vision = load_vision_tower(config.vision)
        llm, tokenizer = load_language_model(config.language, device)
        merged = False
        if adapter_dir is not None:
            llm = attach_lora(llm, config.language, adapter_dir=adapter_dir, trainable=lora_trainable)
            if merge_lora and lora_merge_applies(config, lora_trainable):
                llm, merged = llm.merge_and_unload(), True
        elif config.language.lora_r > 0:
            llm = attach_lora(llm, config.language)
        hidden = llm.get_input_embeddings().embedding_dim
        projector = Projector(config.projector, vision.width, hidden, vision.grid, config.vision.keep_cls)
        compute = torch.bfloat16 if config.language.dtype == "bfloat16" else torch.float32
        vision.to(device=device, dtype=compute)
        projector.to(device=device, dtype=compute)
        return cls(config, vision, projector, llm, tokenizer, lora_merged=merged).eval()

    @classmethod
    def from_pretrained(cls, reference: str, device: str | torch.device = "cpu", lora_trainable: bool = False,
                        merge_lora: bool = False, **language_overrides) -> "MedVLM":
        """Load a checkpoint folder (a path or `demo`); `language_overrides` change e.g. quantization.
        Inference loaders pass `merge_lora=True` (see `build`); training keeps the adapter separate."""
        found = checkpoint.open_checkpoint(reference, **language_overrides)
        model = cls.build(found.config, device=device, adapter_dir=found.adapter_dir, lora_trainable=lora_trainable,
                          merge_lora=merge_lora)
        model.load_trained_parts(found.folder, adapter=False)  # build already loaded the adapter
        return model

    def save_pretrained(self, folder: str | Path, card: str | None = None) -> Path:
        """Write the config and trained parts to `folder` atomically (see vlm.checkpoint); return it."""
        self._check_not_merged("saved")
        adapter = self.llm if hasattr(self.llm, "peft_config") else None
        return checkpoint.write_checkpoint(folder, self.config, self.trainable_state(), adapter=adapter, card=card)

    def load_trained_parts(self, folder: str | Path, adapter: bool = True) -> None:
        """Load a checkpoint's projector, vision tower and (with `adapter`) LoRA weights into this model."""
        checkpoint.load_parts(folder, self.config, self._part_modules())
        if adapter:
            self._check_not_merged("given other LoRA weights")
            checkpoint.load_adapter_weights(self.llm, folder)

    def _check_not_merged(self, what: str) -> None:
        if self.lora_merged:
            raise CheckpointError(f"this model's LoRA adapter was merged into the LLM for inference, so it cannot be "
                                  f"{what}; load it with MedVLM.from_pretrained(..., merge_lora=False).")

    @property
    def device(self) -> torch.device:
        return self.projector.net[0].weight.device

    @property
    def num_image_tokens(self) -> int:
        return self.projector.num_output_tokens()

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor.preprocess(images).to(self.device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, S, S] -> [n_images, num_image_tokens, hidden]."""
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features written into the placeholder positions."""
        is_image = input_ids == self.image_token_id
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        n_positions = int(is_image.sum())
        n_features = 0 if pixel_values is None else pixel_values.shape[0] * self.num_image_tokens
        if n_positions != n_features:
            raise InputError(
                f"image placeholder mismatch: the prompt has {n_positions} image-token positions "
                f"({n_positions / self.num_image_tokens:g} image markers) but {n_features} image features "
                f"were given ({0 if pixel_values is None else pixel_values.shape[0]} images x {self.num_image_tokens})."
            )
        if n_features:
            features = self.image_features(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1).expand_as(embeds), features)
        return embeds

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None,
                past_key_values=None, use_cache: bool = False):
        """The LLM's output for the prompt with images scattered in; with `labels`, `.loss` is the
        mean next-token cross-entropy over the supervised (not IGNORE_INDEX) tokens."""
        embeds = self.embed(input_ids, pixel_values)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache)
        # Vocabulary logits only where some row predicts a supervised token: [B, T, V] for the whole
        # batch is, by a FLOP count, about a fifth of SmolLM2-135M's training step (49k-entry vocabulary).
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=keep, use_cache=False)
        kept = targets[:, keep]
        total = nn.functional.cross_entropy(out.logits.float().flatten(0, 1), kept.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
        out.loss = total / (kept != IGNORE_INDEX).sum().clamp(min=1)
        return out

    def train(self, mode: bool = True):
        """The vision tower's batch norm keeps its running statistics: a frozen tower stays in eval
        mode, and a trained one still normalizes with them, because batches of a few conversations
        (grouped by length, so often all from one dataset) are too small and too uniform to
        replace the statistics its contrastive training estimated."""
        super().train(mode)
        if not self.config.vision.trainable:
            self.vision.eval()
        else:
            for module in self.vision.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def _part_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector, "vision": self.vision.visual}

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The parts a checkpoint stores (vlm.checkpoint.stored_parts decides which), as state dicts."""
        modules = self._part_modules()
        return {part: modules[part].state_dict() for part in checkpoint.stored_parts(self.config)}

    def generate(self, messages_batch: list[list[dict]], images: list[list[Image.Image]], **generation):
        """Generate replies for a batch of conversations; see vlm.generation.generate."""
        from vlm.generation import GenerationConfig, generate

        return generate(self, messages_batch, images, GenerationConfig(**generation))
