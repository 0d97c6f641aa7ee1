"""Calibration and held-out token batches.

``text``: local files (default: the Python standard library's own sources, present on every machine),
split by file into calibration and held-out sets so that the two never overlap, sampled with a seed.
``synthetic``: random token ids, for benchmarks.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from deepseek_ptq.errors import UserError

HELDOUT_PERCENT = 10


@dataclass(frozen=True)
class Batches:
    calib: list[torch.Tensor]  # [batch, seq_len] int64 each
    heldout: list[torch.Tensor]
    byte_level: bool = False  # token = byte: cross-entropy reads as bits per byte

    @property
    def calib_tokens(self) -> int:
        return sum(b.numel() for b in self.calib)


class ByteTokenizer:
    """UTF-8 bytes as token ids: the tokenizer of vocab-256 models."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.empty(0, dtype=torch.int64)


def _tokenizer(tokenizer_path: str | None, ckpt_dir: str | None, vocab_size: int):
    path = Path(tokenizer_path) if tokenizer_path else (Path(ckpt_dir) / "tokenizer.json" if ckpt_dir else None)
    if path is None or (tokenizer_path is None and not path.exists() and vocab_size == 256):
        if vocab_size != 256:
            raise UserError(f"no tokenizer for a vocabulary of {vocab_size}",
                            fix="set data.tokenizer to the model's tokenizer.json (or model.ckpt_dir to a folder holding it)")
        return ByteTokenizer()
    if not path.exists():
        raise UserError(f"tokenizer {path} does not exist", fix="set data.tokenizer to the model's tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))

    class _Wrapped:
        def encode(self, text: str) -> torch.Tensor:
            return torch.tensor(tok.encode(text).ids, dtype=torch.int64)

    return _Wrapped()


def default_corpus() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _text_files(paths: list[str]) -> list[Path]:
    if not paths:
        return default_corpus()
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise UserError(f"data.paths entry {pattern!r} matches no file", fix="give existing files or globs")
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def is_heldout(path: Path) -> bool:
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def read_tokens(files: list[Path], tokenize, what: str) -> torch.Tensor:
    ids: list[torch.Tensor] = []
    for path in files:
        try:
            ids.append(tokenize(path.read_text(encoding="utf-8", errors="replace")))
        except OSError as err:
            raise UserError(f"cannot read {path}: {err.strerror}", fix="fix the file's permissions or drop it from data.paths") from err
    stream = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64)
    if stream.numel() == 0:
        raise UserError(f"the {what} text is empty ({len(files)} files)", fix="give data.paths files with text in them")
    return stream


def _sample(stream: torch.Tensor, count: int, seq_len: int, gen: torch.Generator, what: str) -> torch.Tensor:
    if stream.numel() < seq_len:
        raise UserError(f"the {what} text has {stream.numel()} tokens, fewer than data.seq_len={seq_len}",
                        fix="add text to data.paths or lower data.seq_len")
    starts = torch.randint(0, stream.numel() - seq_len + 1, (count,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def _batch(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(samples.split(batch_size))


def make_batches(data_cfg, vocab_size: int, ckpt_dir: str | None, heldout_samples: int) -> Batches:
    """The calibration batches and the held-out batches, the same for the same seed on every rank."""
    if data_cfg.num_samples < 1:
        raise UserError(f"data.num_samples={data_cfg.num_samples}: calibration needs at least one sample",
                        fix="set data.num_samples to 1 or more")
    if data_cfg.seq_len < 1 or data_cfg.batch_size < 1:
        raise UserError("data.seq_len and data.batch_size must be at least 1", fix="set them to positive values")
    gen = torch.Generator().manual_seed(data_cfg.seed)
    if data_cfg.name == "synthetic":
        calib = torch.randint(0, vocab_size, (data_cfg.num_samples, data_cfg.seq_len), generator=gen)
        heldout = torch.randint(0, vocab_size, (heldout_samples, data_cfg.seq_len), generator=gen)
        return Batches(_batch(calib, data_cfg.batch_size), _batch(heldout, data_cfg.batch_size) if heldout_samples else [])
    tokenizer = _tokenizer(data_cfg.tokenizer, ckpt_dir, vocab_size)
    tokenize = tokenizer.encode
    files = _text_files(list(data_cfg.paths))
    if not files:
        raise UserError("data.paths lists no readable file", fix="give existing text files or globs")
    held = [f for f in files if is_heldout(f)]
    calib_files = [f for f in files if not is_heldout(f)]
    if not held or not calib_files:
        # Too few files to split by name: split the one stream instead (first 90% / last 10%).
        stream = read_tokens(files, tokenize, "data")
        cut = stream.numel() * (100 - HELDOUT_PERCENT) // 100
        calib_stream, held_stream = stream[:cut], stream[cut:]
    else:
        calib_stream = read_tokens(calib_files, tokenize, "calibration")
        held_stream = read_tokens(held, tokenize, "held-out") if heldout_samples else torch.empty(0, dtype=torch.int64)
    calib = _sample(calib_stream, data_cfg.num_samples, data_cfg.seq_len, gen, "calibration")
    heldout = _sample(held_stream, heldout_samples, data_cfg.seq_len, gen, "held-out") if heldout_samples else calib[:0]
    if int(calib.max()) >= vocab_size:
        raise UserError(f"the tokenizer produced id {int(calib.max())} but the model's vocabulary is {vocab_size}",
                        fix="use the model's own tokenizer")
    return Batches(_batch(calib, data_cfg.batch_size), _batch(heldout, data_cfg.batch_size) if heldout_samples else [],
                   byte_level=isinstance(tokenizer, ByteTokenizer))
