"""Writing safetensors files with bounded memory.

``PlannedFile``: a file whose tensors are all known up front (names, dtypes, shapes); its header is written
first and each tensor is written into its place when it arrives, so a converter never holds a whole rank's
shard. ``ShardedWriter``: Hugging Face style ``model-0000i-of-0000N.safetensors`` files of bounded size plus
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepseek_ptq.files import set_default_mode

DTYPE_NAMES = {torch.float8_e4m3fn: "F8_E4M3", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
               torch.float64: "F64", torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL", torch.float8_e5m2: "F8_E5M2"}
_DTYPE_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1, "I32": 4,
                "I64": 8, "BOOL": 1}
INDEX_NAME = "model.safetensors.index.json"


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class PlannedFile:
    """A safetensors file laid out from (name, dtype name, shape) before any data is written."""

    def __init__(self, path: Path, layout: dict[str, tuple[str, list[int]]]) -> None:
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        self._spans: dict[str, tuple[int, int, str, list[int]]] = {}
        offset = 0
        for name in sorted(layout):
            dtype, shape = layout[name]
            size = math.prod(shape) * _DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._spans[name] = (offset, size, dtype, list(shape))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8 bytes with spaces
        self._data_start = 8 + len(encoded)
        self._written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self._data_start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        start, size, dtype, shape = self._spans[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{self.path.name}: {name} planned as {dtype}{shape}, got {tensor.dtype}{list(tensor.shape)}")
        self._file.seek(self._data_start + start)
        self._file.write(_raw_bytes(tensor))
        self._written.add(name)

    def close(self) -> None:
        """Close the file; every planned tensor must have been written."""
        self._file.close()
        missing = sorted(set(self._spans) - self._written)
        if missing:
            raise ValueError(f"{self.path.name}: {len(missing)} planned tensors never written, first {missing[:3]}")


class ShardedWriter:
    """Tensors in arrival order, a new file whenever the current one would pass ``max_shard_bytes``."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        part = f"part-{len(self._files) + 1:05d}.safetensors"
        save_file(self._pending, str(self.out_dir / part), metadata={"format": "pt"})
        set_default_mode(self.out_dir / part)  # safetensors writes 0600
        self._files.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Write the last file, give every file its final ``-of-N`` name and write the index; the weight map."""
        if self._pending:
            self._flush()
        n = len(self._files)
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._files, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / part, self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
