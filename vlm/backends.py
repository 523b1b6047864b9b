"""Which Assistant a `--model` reference names, loaded: the one place that knows every kind
(vlm.assistant describes the interface; each kind lives in its own module)."""

from __future__ import annotations

from vlm.assistant import Assistant


def as_assistant(model, reference: str = "") -> Assistant:
    """`model` as an Assistant: an Assistant as it is, a MedVLM wrapped (library callers and tests
    may hand over the model they hold)."""
    if isinstance(model, Assistant):
        return model
    from vlm.medvlm_assistant import MedVLMAssistant

    return MedVLMAssistant(model, reference)


def load_assistant(reference: str, *, device: str = "cpu", prompt_style: str = "ours",
                   **options) -> Assistant:
    """The assistant `reference` names (see the module docstring). `options` are the kind's own:
    dtype, quantization (medvlm, transformers); device_map, revision, trust_remote_code
    (transformers); api_key_env, concurrency, timeout, max_retries (openai). An option a kind
    does not take is a ConfigError naming it."""
    from vlm.sources import model_kind

    kind = model_kind(reference)
    if kind == "openai":
        from vlm.openai_assistant import OpenAIAssistant

        return OpenAIAssistant.from_reference(reference, prompt_style=prompt_style, **options)
    if kind == "transformers":
        from vlm.hf_assistant import TransformersAssistant

        return TransformersAssistant.from_reference(reference, device=device, prompt_style=prompt_style, **options)
    from vlm.medvlm_assistant import MedVLMAssistant

    return MedVLMAssistant.from_reference(reference, device=device, prompt_style=prompt_style, **options)
