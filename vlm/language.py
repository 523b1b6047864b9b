"""Load the causal LLM and its tokenizer (fp32/bf16, 8-bit or 4-bit NF4), and attach LoRA."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from vlm.config import LanguageConfig
from vlm.errors import ConfigError, ModelSourceError
from vlm.fileio import atomic_folder
from vlm.sources import Source, hub_hint, resolve

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """Where converted GGUF models are kept ($MEDVLM_CACHE, else ~/.cache/medvlm)."""
    return Path(os.environ.get("MEDVLM_CACHE", Path.home() / ".cache" / "medvlm"))


def load_language_model(cfg: LanguageConfig, device: str | torch.device = "cpu"):
    """Return (model, tokenizer) for `cfg`. Frozen, in eval mode; LoRA is attached separately."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(cfg.source)
    folder, hub_kwargs = _loadable_folder(source)
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, **hub_kwargs)
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except OSError as e:
        if source.kind == "hub":
            raise ModelSourceError(f"LLM {cfg.source!r}: {hub_hint(source.location)}") from e
        raise ModelSourceError(f"LLM {cfg.source!r}: cannot load a model from {folder}: {e}") from e
    if quant is None:
        model.to(device)
    if cfg.quantization == "4bit":
        disable_cpu_weight_repacking(model)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def quantization_config(cfg: LanguageConfig):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def disable_cpu_weight_repacking(model: nn.Module) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit weight into a layout that has no
    # backward after the first no-grad forward (e.g. generate); LoRA gradients then silently become
    # None. Turning the fast path off keeps the weights trainable at all times.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model: nn.Module, cfg: LanguageConfig, adapter_dir: str | Path | None = None, trainable: bool = False):
    """Wrap `model` with a peft LoRA adapter: a fresh one (cfg.lora_r) or one saved in `adapter_dir`."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    if cfg.lora_r <= 0:
        raise ConfigError("attach_lora needs language.lora_r > 0.")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.lora_targets if t in present]
    if not targets:
        raise ConfigError(f"none of the LoRA targets {list(cfg.lora_targets)} exist in this LLM.")
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=targets, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _loadable_folder(source: Source) -> tuple[str, dict]:
    """A folder (or hub id) that from_pretrained opens fast; GGUF files are converted once and cached."""
    if source.gguf_file:
        return str(_converted_gguf(Path(source.location) / source.gguf_file)), {}
    if source.kind == "demo":
        raise ModelSourceError("'demo' names a whole MedVLM checkpoint, not an LLM; use it as --model.")
    return source.location, {}


def _converted_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF file into a float32 safetensors folder once; later loads take a second.

    transformers converts GGUF (tokenizer and weights) on every load, which takes ~40 s even for a
    135M model on 2 CPU cores. The converted copy is keyed by the file's path, size and mtime.
    """
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) in %s", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types for unsupported or damaged files
        raise ModelSourceError(f"GGUF file {gguf_path}: cannot be read by transformers ({e}).") from e
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = AutoConfig.for_model(**config)
    with atomic_folder(target, replace=False) as tmp:  # replace=False: another process may finish first
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
    return target
