"""The task prompts (VQA, report) and the conversations they start, as prompt styles.

`OURS` is medvlm's fixed wording, the one every results file of ours was scored with. A
`--prompt-style native` run asks a model with its model card's recommended wording instead, where
the small table `NATIVE_STYLES` has one for its family (keyed by the transformers `model_type`).
Either way the style is recorded in the results.

Their `<image>` marker is the LLaVA data format's (what training data files carry, and the
default `MedVLMConfig.image_marker`); every assistant turns it into its model's own image input
(vlm.assistant).
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm.errors import ConfigError

IMAGE_MARKER = "<image>"
VQA_FOLLOWUP = "{question}\nAnswer briefly."
VQA_PROMPT = IMAGE_MARKER + "\n" + VQA_FOLLOWUP
REPORT_PROMPT = (
    IMAGE_MARKER + "\nDraft the findings section of a radiology report for this chest X-ray. "
    "Write short sentences about the lungs, pleura, heart and mediastinum."
)


@dataclass(frozen=True)
class PromptStyle:
    """How the tasks ask: a VQA template (with `{question}`), a report prompt, and optionally a
    system prompt (None: the model's own default, e.g. a medvlm checkpoint's `system_prompt`)."""
    name: str
    vqa: str
    report: str
    system: str | None = None

    def vqa_messages(self, question: str) -> list[dict]:
        return self._with_system({"role": "user", "content": self.vqa.format(question=question.strip())})

    def report_messages(self) -> list[dict]:
        return self._with_system({"role": "user", "content": self.report})

    def _with_system(self, user: dict) -> list[dict]:
        return [{"role": "system", "content": self.system}, user] if self.system else [user]

    def describe(self) -> dict:
        return {"prompt_style": self.name, "vqa_prompt": self.vqa, "report_prompt": self.report,
                "style_system_prompt": self.system}


OURS = PromptStyle("ours", VQA_PROMPT, REPORT_PROMPT)

# The model cards' own wording. MedGemma (google/medgemma-4b-it card): system "You are an expert
# radiologist." and a plain request with the image. Qwen2.5-VL (and Lingshu, trained from it):
# the short-answer instruction of Qwen-VL's VQA evaluation; its template adds its own system prompt.
NATIVE_STYLES = {
    "gemma3": PromptStyle("native:medgemma", IMAGE_MARKER + "\n{question}",
                          IMAGE_MARKER + "\nDescribe this X-ray.", system="You are an expert radiologist."),
    "qwen2_5_vl": PromptStyle("native:qwen2.5-vl", IMAGE_MARKER + "\n{question}\nAnswer the question using a "
                              "single word or phrase.", IMAGE_MARKER + "\nDescribe this X-ray."),
}
NATIVE_STYLES["qwen2_vl"] = NATIVE_STYLES["qwen2_5_vl"]
PROMPT_STYLES = ("ours", "native")


def prompt_style(name: str, family: str | None) -> PromptStyle:
    """The style `name` ("ours" or "native") for a model of `family` (a transformers model_type,
    None for medvlm checkpoints and endpoints of unknown family)."""
    if name == "ours":
        return OURS
    if name != "native":
        raise ConfigError(f"--prompt-style {name!r}: choose one of {', '.join(PROMPT_STYLES)}.")
    if family not in NATIVE_STYLES:
        known = ", ".join(sorted(NATIVE_STYLES))
        raise ConfigError(f"--prompt-style native: no model-card prompt is configured for model type {family!r} "
                          f"(configured: {known}); use --prompt-style ours.")
    return NATIVE_STYLES[family]


def vqa_messages(question: str) -> list[dict]:
    return OURS.vqa_messages(question)


def report_messages() -> list[dict]:
    return OURS.report_messages()
