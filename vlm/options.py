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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --device and the LLM overrides, shared by every command that loads a model."""
    parser.add_argument("--model", default="demo", help="checkpoint folder or 'demo' (default: demo)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    add_options(parser, LanguageConfig, LANGUAGE_OVERRIDES)


def load_model_from_args(args):
    from vlm.model import MedVLM

    return MedVLM.from_pretrained(args.model, device=pick_device(args.device), **collect(args, LanguageConfig, LANGUAGE_OVERRIDES))


def pick_device(requested: str | None) -> str:
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: no CUDA GPU is available here; use --device cpu.")
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"
