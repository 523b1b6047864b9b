"""The task prompts (VQA, report) and the conversations they start.

Their `<image>` marker is the LLaVA data format's (what training data files carry, and the
default `MedVLMConfig.image_marker`); everything else about markers, the chat template and
encoding is vlm.processor's.
"""

from __future__ import annotations

VQA_FOLLOWUP = "{question}\nAnswer briefly."
VQA_PROMPT = "<image>\n" + VQA_FOLLOWUP
REPORT_PROMPT = (
    "<image>\nDraft the findings section of a radiology report for this chest X-ray. "
    "Write short sentences about the lungs, pleura, heart and mediastinum."
)


def vqa_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": VQA_PROMPT.format(question=question.strip())}]


def report_messages() -> list[dict]:
    return [{"role": "user", "content": REPORT_PROMPT}]
