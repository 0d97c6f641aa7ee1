"""Opening a safetensors file for reading, the one way every checkpoint reader does it: a truncated or corrupt
file is one error naming the file and the fix, not safetensors' bare "Error while deserializing header".

safetensors checks the header and that it covers the file exactly when the file is opened, so a truncated
file fails here, in milliseconds, before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deepseek_ptq.errors import UserError

REPAIR = "copy the file again from where it came from, or re-create the checkpoint (deepseek-ptq-convert)"


@contextmanager
def open_safetensors(path: Path, fix: str = REPAIR) -> Iterator[Any]:
    """``safe_open(path, framework="pt")``; a file safetensors cannot read, at open or while reading a tensor,
    raises a UserError naming ``path`` and ``fix``."""
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError as err:
        raise UserError(f"{path} does not exist", fix=fix) from err
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable safetensors file, truncated or corrupt ({err})", fix=fix) from err
    with handle as f:
        try:
            yield f
        except SafetensorError as err:
            raise UserError(f"{path} cannot be read, corrupt ({err})", fix=fix) from err


def load_safetensors(path: Path, fix: str = REPAIR) -> dict[str, torch.Tensor]:
    """Every tensor of the file (safetensors.torch.load_file, with the clear error)."""
    with open_safetensors(path, fix) as f:
        return {key: f.get_tensor(key) for key in f.keys()}
