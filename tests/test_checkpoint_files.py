"""Damaged safetensors files: a truncated or corrupt checkpoint shard is one error naming the file and the fix,
before any weight is read; a damaged shard of the cache is written again, never trusted."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from test_cli import TINY, assert_failed, cli

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.checkpoint import ShardReader, cache_marker, shard_name
from deepseek_ptq.model.load import PACKAGE_DIR, ensure_packaged_checkpoint
from deepseek_ptq.model.safetensors_file import open_safetensors

TINY_SHARD = PACKAGE_DIR / "tiny" / shard_name(0, 1)


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.unlink()  # (a link to the packaged file must not truncate the package)
    path.write_bytes(data[:keep])


def test_truncated_checkpoint_shard_is_named_with_the_fix(tmp_path, cache_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / shard_name(0, 1)).write_bytes(TINY_SHARD.read_bytes()[:TINY_SHARD.stat().st_size // 2])
    (ckpt / "config.json").write_text((PACKAGE_DIR / "tiny" / "config.json").read_text())
    start = time.perf_counter()
    result = cli(tmp_path / "run", f"model.ckpt_dir={ckpt}", "logger=none", timeout=60)
    assert_failed(result, tmp_path / "run", str(ckpt / shard_name(0, 1)), "truncated or corrupt", "re-create")
    assert "Traceback" not in result.stderr and "SafetensorError" not in result.stderr
    assert time.perf_counter() - start < 10
    # Every other reader opens it the same way.
    with pytest.raises(UserError, match="model0-mp1.safetensors is not a readable safetensors file"):
        ShardReader(ckpt, 1)


def test_corrupt_header_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    data = bytearray(TINY_SHARD.read_bytes()[:4096])
    data[20] = 0xFF  # inside the JSON header
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{bad} is not a readable safetensors file.*Fix: re-download it"):
        with open_safetensors(bad, fix="re-download it"):
            pass


def test_damaged_cache_shard_is_written_again(tmp_path, caplog):
    cache = tmp_path / "cache"
    folder = ensure_packaged_checkpoint("tiny", TINY, 2, cache)
    good = {r: (folder / shard_name(r, 2)).read_bytes() for r in range(2)}
    marker = json.loads((folder / cache_marker(2)).read_text())
    assert {n: m["bytes"] for n, m in marker.items() if n != "config.json"} == {
        shard_name(r, 2): len(good[r]) for r in range(2)}

    def damage_and_reuse(damage) -> str:
        damage()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deepseek_ptq.model.checkpoint"):
            assert ensure_packaged_checkpoint("tiny", TINY, 2, cache) == folder
        for r in range(2):
            assert (folder / shard_name(r, 2)).read_bytes() == good[r]
        return caplog.text

    shard1 = folder / shard_name(1, 2)
    assert "model1-mp2.safetensors has" in damage_and_reuse(lambda: _truncate(shard1, 1000))

    def flip_a_weight_byte() -> None:  # same size, header intact: only the digest sees it
        data = bytearray(good[0])
        data[-100] ^= 0xFF
        (folder / shard_name(0, 2)).write_bytes(bytes(data))

    assert "model0-mp2.safetensors differs from what was written" in damage_and_reuse(flip_a_weight_byte)
    # A folder without its marker (written before markers, or stopped while writing) is written anew.
    damage_and_reuse(lambda: ((folder / cache_marker(2)).unlink(), _truncate(shard1, 1000)))
    assert json.loads((folder / cache_marker(2)).read_text()) == marker
    # An intact cache is used as it is, without a warning.
    assert damage_and_reuse(lambda: None) == ""
