"""Command-line options derived from the config dataclasses, so each option is defined once.

A field's type gives the option's type, its default the default, and the docstring under the
field (read from the source) its help text. The model options every command that loads a model
shares (--model, --device, the LLM overrides) live here too, so that the commands of `train`,
`eval` and `serve` take them from the library.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache

from vlm.config import LanguageConfig
from vlm.errors import ConfigError
from vlm.prompts import PROMPT_STYLES

LANGUAGE_OVERRIDES = ["quantization", "dtype"]


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass: the string literal right after each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def add_options(parser: argparse.ArgumentParser, cls: type, fields: list[str], prefix: str = "",
                sep: str = "-") -> None:
    """Add `--[prefix<sep>]field-name` for each named field of dataclass `cls`; defaults stay None so
    that only options the user gave override a loaded config."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    for name in fields:
        f = known[name]
        flag = "--" + (f"{prefix}{sep}" if prefix else "") + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(name, '')} (default: {default})".strip()
        kind = _base_type(hints[name])
        if kind is bool:
            parser.add_argument(flag, dest=_dest(prefix, name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=_dest(prefix, name), type=kind, default=None, help=help_text, metavar=name.upper())


def collect(args: argparse.Namespace, cls: type, fields: list[str], prefix: str = "") -> dict:
    """The options of `fields` that the user gave, as a dict for dataclass `cls`."""
    values = {name: getattr(args, _dest(prefix, name), None) for name in fields}
    return {k: v for k, v in values.items() if v is not None}


def simple_fields(cls: type) -> list[str]:
    """Fields a command-line option can set (str, int, float, bool, or optional of those)."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _base_type(hints[f.name]) in (str, int, float, bool)]


def _sections(cls: type) -> dict[str, type]:
    """The fields of dataclass `cls` that are dataclasses themselves (MedVLMConfig.language, ...)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def add_nested_options(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    """`--PREFIX.field-name` for the simple fields of dataclass `cls` and `--PREFIX.section.field-name`
    for those of its dataclass fields, e.g. `--model.language.lora-r` for MedVLMConfig."""
    add_options(parser, cls, simple_fields(cls), prefix, sep=".")
    for name, section in _sections(cls).items():
        add_nested_options(parser, section, f"{prefix}.{name}")


def collect_nested(args: argparse.Namespace, cls: type, prefix: str) -> dict:
    """The options of add_nested_options that the user gave, as a nested dict of fields
    (e.g. {"language": {"lora_r": 16}}), for MedVLMConfig.replace or a config's `model:` section."""
    values = collect(args, cls, simple_fields(cls), prefix)
    for name, section in _sections(cls).items():
        given = collect_nested(args, section, f"{prefix}.{name}")
        if given:
            values[name] = given
    return values


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}_{name}" if prefix else name


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) else hint


MODEL_HELP = ("the model: demo, a medvlm checkpoint folder, hf:ORG/NAME or a folder with a transformers "
              "image-text-to-text model, or openai:BASE_URL#MODEL (an OpenAI-compatible endpoint) (default: demo)")
# The options of each model kind beyond --model/--device (vlm.assistant.load_assistant).
KIND_OPTIONS = {
    "medvlm": ("dtype", "quantization"),
    "transformers": ("dtype", "quantization", "device_map", "revision", "trust_remote_code"),
    "openai": ("api_key_env", "timeout", "max_retries"),
}


def add_model_options(parser: argparse.ArgumentParser, prompt_style: bool = False) -> None:
    """--model, --device and the options of each model kind, shared by every command that loads a
    model; with `prompt_style`, --prompt-style too (commands that ask the task prompts)."""
    parser.add_argument("--model", default="demo", help=MODEL_HELP)
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    add_options(parser, LanguageConfig, LANGUAGE_OVERRIDES)
    hf = parser.add_argument_group("transformers models (hf:ORG/NAME or a folder)")
    hf.add_argument("--device-map", default=None, help="transformers device_map, e.g. auto to spread a large model "
                                                       "over the GPUs (default: all on --device)")
    hf.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) to load")
    hf.add_argument("--trust-remote-code", action="store_true", default=None,
                    help="run the model repository's own Python code (off unless you ask: read it first)")
    api = parser.add_argument_group("OpenAI-compatible endpoints (openai:BASE_URL#MODEL)")
    api.add_argument("--api-key-env", default=None, help="environment variable holding the API key "
                                                          "(default: OPENAI_API_KEY if set)")
    api.add_argument("--timeout", type=float, default=None, help="seconds to wait for one answer (default: 120)")
    api.add_argument("--max-retries", type=int, default=None,
                     help="retries of a request on 429, 5xx, timeouts and lost connections (default: 5)")
    if prompt_style:
        parser.add_argument("--prompt-style", default="ours", choices=PROMPT_STYLES,
                            help="ours: medvlm's fixed task prompts; native: the model card's recommended prompt, "
                                 "where one is configured for the model's family (default: ours)")


def load_assistant_from_args(args, concurrency: int | None = None):
    """The Assistant that --model names, with the options the user gave for its kind (an option of
    another kind is a ConfigError naming it). `concurrency`: requests an endpoint may have in flight."""
    from vlm.backends import load_assistant
    from vlm.sources import model_kind

    kind = model_kind(args.model)
    given = {name: getattr(args, name, None) for names in KIND_OPTIONS.values() for name in names}
    given = {k: v for k, v in given.items() if v is not None}
    foreign = sorted(set(given) - set(KIND_OPTIONS[kind]))
    if foreign:
        flags = ", ".join("--" + f.replace("_", "-") for f in foreign)
        raise ConfigError(f"{flags}: not an option of {kind} models (--model {args.model}).")
    if kind == "openai" and concurrency is not None:
        given["concurrency"] = concurrency
    device = pick_device(args.device) if kind != "openai" else "cpu"
    return load_assistant(args.model, device=device, prompt_style=getattr(args, "prompt_style", "ours"), **given)


def load_model_from_args(args):
    """A medvlm checkpoint (MedVLM) for the commands that look inside one (info, bench serving), loaded
    for inference: its LoRA adapter merged into the LLM's weights (see MedVLM.build)."""
    from vlm.model import MedVLM
    from vlm.sources import model_kind

    if model_kind(args.model) != "medvlm":
        raise ConfigError(f"--model {args.model}: this command needs a medvlm checkpoint (demo or a folder).")
    return MedVLM.from_pretrained(args.model, device=pick_device(args.device), merge_lora=True,
                                  **collect(args, LanguageConfig, LANGUAGE_OVERRIDES))


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA GPU is available here; use --device cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
