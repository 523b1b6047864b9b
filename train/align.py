"""Stage 2a, projector alignment (LLaVA-Med stage 1): image-caption pairs, only the projector trains.

The vision tower and the LLM stay frozen, so the projector learns to say what the tower sees in
words the LLM already knows.
"""

from __future__ import annotations

from train.vlm_stage import VLMStage


class AlignStage(VLMStage):
    name = "align"

    def configure(self, model):
        model.requires_grad_(False)
        model.projector.requires_grad_(True)
        return model

    def _load(self, path: str):
        return self._pairs_as_conversations(path)
