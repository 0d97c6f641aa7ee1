"""Writes that never leave a half-written file or folder behind: written aside, renamed into place at the end.

The temporary file or folder (tempfile makes them 0600 / 0700) gets the mode an ordinary ``open`` or ``mkdir``
would give under the process's umask (0644 / 0755 by default): others can read the results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deepseek_ptq.errors import UserError


def check_new_output(out: Path) -> None:
    """Refuse an ``--out`` that holds anything: nothing of the user's is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder",
                        fix="choose a new output folder or remove the old one")


def umask() -> int:
    """The process's umask, read without setting it (``os.umask`` sets it too: a race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """The mode ``open`` (a file) or ``mkdir`` (a folder) gives under the umask: 0644 / 0755 by default."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (same file system); it becomes ``out`` on success, vanishes on error."""
    check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        set_default_mode(tmp)
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        set_default_mode(Path(tmp))  # mkstemp made it 0600 (and some writers, safetensors', write a new 0600 file)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
    atomic_write(path, dump)


class _WriteErrors:
    """A binary file that keeps the OSError of a write the file system refused. torch.save reports a short or
    failed write only as its zip writer's RuntimeError ("unexpected pos 475840 vs 475728"), naming neither the
    file nor the cause; a buffered file reports a full disk first as a short write, so the rest is written again,
    which raises."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += self._f.write(view[done:])
        except OSError as err:
            self.error = err
            raise
        return done

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as err:
            self.error = err
            raise


def torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)``, except that a write the file system refuses (a full disk, a file-size limit)
    raises its OSError (ENOSPC, EFBIG) instead of torch's RuntimeError."""
    import torch

    with open(path, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except Exception:
            if out.error is not None:
                raise out.error from None
            raise

