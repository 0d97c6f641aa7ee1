"""Reading tensors straight into a reused buffer (model/span_reader.py) gives safetensors' own tensors."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.span_reader import SpanReader, layout_bytes


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": (torch.randn(37, 129, generator=gen) * 100).to(torch.float8_e4m3fn),
        "a.scale": torch.rand(1, 2, generator=gen),
        "b.weight": torch.randn(5, 3, 7, generator=gen).bfloat16(),
        "b.bias": torch.randn(3, generator=gen).half(),
        "c.scalar": torch.tensor(2.5),
        "c.ids": torch.arange(11, dtype=torch.int64),
        "c.empty": torch.empty(0, 4),
        "c.mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("chunk", [7, 64 << 20])
def test_read_into_gives_the_stored_tensors(tmp_path, chunk):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    reader = SpanReader(path, threads=3, chunk_bytes=chunk)
    try:
        keys = ["c.mask", "a.weight", "b.weight", "c.scalar", "c.empty", "b.bias", "a.scale", "c.ids"]
        buffer = torch.full((layout_bytes([reader.spans[k] for k in keys]),), 0xAB, dtype=torch.uint8)
        got = reader.read_into(keys, buffer)
        with safe_open(str(path), framework="pt") as f:
            for key in keys:
                want = f.get_tensor(key)
                assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
                assert torch.equal(got[key].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), key
        # a second read into the same buffer (another layer) overwrites it in place
        again = reader.read_into(["b.bias"], buffer)
        assert again["b.bias"].data_ptr() == buffer.data_ptr()
    finally:
        reader.close()


def test_a_file_truncated_after_opening_is_named(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    reader = SpanReader(path)
    try:
        last = max(reader.spans, key=lambda k: reader.spans[k].start + reader.spans[k].nbytes)
        os.truncate(path, reader.spans[last].start + 1)
        with pytest.raises(UserError, match="ended .* bytes early"):
            reader.read_into([last], torch.empty(layout_bytes([reader.spans[last]]), dtype=torch.uint8))
    finally:
        reader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_registered_host_buffer_is_pinned_and_copies_asynchronously():
    from deepseek_ptq.pipeline.stream import HostBuffer

    buffer = HostBuffer(3 << 20, pinned=True)
    try:
        assert buffer.tensor.is_pinned() and buffer.tensor[7:1000].is_pinned()
        buffer.tensor.copy_(torch.arange(3 << 20, dtype=torch.int64).to(torch.uint8))
        on_device = buffer.tensor.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_device.cpu(), buffer.tensor)
    finally:
        buffer.free()
    assert not buffer.pinned and buffer.tensor.numel() == 0
