"""One way to write a file that is never left torn: checkpoints, best.pt, PNGs, JSON reports."""
from __future__ import annotations

import os
import uuid


def write_atomic(path: str, write) -> str:
    """``write(f)`` into a temporary file in ``path``'s folder (created), flushed and fsync'ed, then
    ``os.replace``'d over ``path`` and the folder fsync'ed. A failure or interrupt (disk full, Ctrl-C,
    SIGKILL) leaves the old file at ``path`` as it was and removes the temporary one; an existing file
    keeps its permissions. Returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isfile(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse directory fsync
        pass
    return path
