"""Writing folders atomically; a model folder's digest."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(target: str | Path, tmp_prefix: str | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `target` that becomes `target` in one rename when the block
    ends without error, and is deleted otherwise.

    Readers never see a half-written folder, even when the writer is killed (SIGKILL included):
    a leftover temporary folder is all that remains. An existing `target` is replaced, or, with
    replace=False (another process finished the same work first), kept and the new copy dropped.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=tmp_prefix or f".{target.name}.tmp-"))
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
        elif replace:
            old = target.with_name(f".{target.name}.old-{tmp.name[-8:]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


DIGEST_FULL_LIMIT = 2 * 2**30
"""Up to this many bytes of weights a digest reads every byte; above it, each safetensors file's
header (names, shapes, dtypes) and size, so describing a 30 GB model does not read 30 GB."""


def folder_digest(folder: str | Path) -> str:
    """A sha256 over a model folder's configs and weights (*.json, *.jinja, *.safetensors, and
    those in sub-folders such as an adapter/), prefixed "sha256:" or, for large weights,
    "sha256-headers:" (see DIGEST_FULL_LIMIT)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".jinja", ".safetensors"))
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    full = weights <= DIGEST_FULL_LIMIT
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            if full or path.suffix != ".safetensors":
                for block in iter(lambda: f.read(2**20), b""):
                    digest.update(block)
            else:  # an 8-byte little-endian header length, then the JSON header
                head = f.read(8)
                digest.update(head + f.read(int.from_bytes(head, "little")) + str(path.stat().st_size).encode())
    return ("sha256:" if full else "sha256-headers:") + digest.hexdigest()
