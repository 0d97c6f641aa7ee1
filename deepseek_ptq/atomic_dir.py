"""An output folder that appears only when complete: written aside, renamed into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from deepseek_ptq.errors import UserError


def check_new_output(out: Path) -> None:
    """Refuse an ``--out`` that holds anything: nothing of the user's is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder",
                        fix="choose a new output folder or remove the old one")


@contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (same file system); it becomes ``out`` on success, vanishes on error."""
    check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
