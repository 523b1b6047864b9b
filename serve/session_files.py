"""Where the app keeps files that may hold patient data (uploads, report drafts), and their removal.

Each app gets private folders (mode 0700) under `<tmp>/medvlm-<uid>/<kind>/<pid>-<token>`.
A session's files are deleted when the session ends; the folders of a process that is gone
(a crash, a kill -9) are deleted when the next server starts, so nothing lingers on disk.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def private_folder(kind: str) -> Path:
    """A fresh folder for this app's files of `kind`; stale ones of dead processes are removed first."""
    base = Path(tempfile.gettempdir()) / f"medvlm-{os.getuid()}" / kind
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base.parent, 0o700)
    removed = 0
    for entry in base.iterdir():
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    if removed:
        log.info("removed %d %s folder(s) left by servers that are no longer running", removed, kind)
    folder = base / f"{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(mode=0o700)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to clean
        return True
    return True


def delete_files(paths, root: Path) -> int:
    """Delete files (and the folders Gradio made for them, once empty) that lie under `root`;
    anything outside it is left alone. Returns how many files were deleted."""
    deleted = 0
    root = root.resolve()
    for path in paths:
        path = Path(path).resolve()
        if root not in path.parents:
            continue
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("could not delete an uploaded file")
        parent = path.parent
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent
    return deleted
