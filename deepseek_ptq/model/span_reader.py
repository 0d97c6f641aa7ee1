"""Tensors of a safetensors file read straight into a caller's buffer (a reused pinned arena for streaming).

``safe_open(...).get_tensor`` allocates a fresh tensor per call, and the device copy then wants it pinned:
a second host copy and, at 671B, 11 GB of fresh pinned memory per MoE layer (0.6-0.8 GB/s in all on one H200
host, benchmarks/NOTES.md). Here each tensor's bytes go from the file into its place in one buffer with
``os.preadv`` on several threads (the GIL is released while they read): one copy, no allocation per layer.

The file's header is read here too (8 bytes of length, then JSON: dtype, shape, data_offsets per tensor);
safetensors has already checked it when the shard was opened (model/safetensors_file.py).
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.safetensors_file import REPAIR

DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
_ALIGN = 64  # every tensor starts on a 64-byte boundary of the buffer: any dtype may view it
_CHUNK = 64 << 20  # one pread call at most this much: big tensors are read by several threads at once


@dataclass(frozen=True)
class Span:
    start: int  # absolute file offset of the tensor's first byte
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_spans(path: Path) -> dict[str, Span]:
    """Name -> where each tensor's bytes lie in the file."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    spans = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise UserError(f"{path}: {key} has dtype {entry['dtype']}, which this reader does not know",
                            fix="convert the checkpoint with deepseek-ptq-convert (FP8, BF16 or F32 tensors)")
        spans[key] = Span(base + begin, end - begin, DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return spans


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def layout_bytes(spans: list[Span]) -> int:
    """Bytes of buffer that ``SpanReader.read_into`` needs for these tensors."""
    return sum(_aligned(s.nbytes) for s in spans)


class SpanReader:
    """One open file and a pool of reader threads."""

    def __init__(self, path: Path, threads: int = 8, chunk_bytes: int = _CHUNK) -> None:
        self.path, self.chunk_bytes = path, chunk_bytes
        self.spans = read_spans(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pread")

    def _pread(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise UserError(f"{self.path} ended {len(view) - done} bytes early while reading (truncated?)",
                                fix=REPAIR)
            done += n

    def read_into(self, keys: list[str], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors ``keys``, each a view of ``buffer`` (uint8, CPU, at least ``layout_bytes`` long)."""
        assert buffer.dtype == torch.uint8 and buffer.device.type == "cpu" and buffer.is_contiguous()
        raw = buffer.numpy()  # shares the buffer's memory: preadv writes into it
        out, jobs, at = {}, [], 0
        for key in keys:
            span = self.spans[key]
            for piece in range(0, span.nbytes, self.chunk_bytes):
                n = min(self.chunk_bytes, span.nbytes - piece)
                jobs.append(self._pool.submit(self._pread, memoryview(raw[at + piece:at + piece + n]),
                                              span.start + piece))
            out[key] = buffer[at:at + span.nbytes].view(span.dtype).view(span.shape)
            at += _aligned(span.nbytes)
        for job in jobs:
            job.result()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        os.close(self._fd)
