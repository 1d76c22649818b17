"""Writing a file so that a reader never sees half of it: the artifact, the log's JSON summary, submission.json, the
eval dump, the single-file script. Shared by the run and the tools, so it sits below both (it imports nothing of lcq).
"""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write via a temp file in the same folder, fsync, rename: readers see the old file or the new one, never half of
    one, and a failure leaves no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno is not None and e.filename is None:
            # name the file: a bare "[Errno 28] No space left on device" from write() does not say where (issue 10)
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
