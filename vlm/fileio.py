"""Writing folders atomically."""

from __future__ import annotations

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
