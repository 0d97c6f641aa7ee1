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
from deepseek_ptq.pipeline.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_file

HELDOUT_PERCENT = 10
SNIFF_BYTES = 1 << 16  # what the check before the run reads of each text file
MAX_INVALID_UTF8 = 0.01  # share of bytes that are not UTF-8 above which a file is not text


@dataclass(frozen=True)
class Batches:
    calib: list[torch.Tensor]  # [batch, seq_len] int64 each
    heldout: list[torch.Tensor]
    byte_level: bool = False  # token = byte: cross-entropy reads as bits per byte

    @property
    def calib_tokens(self) -> int:
        return sum(b.numel() for b in self.calib)


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


def check_text(path: Path, data: bytes) -> None:
    """Refuse a file that is not UTF-8 text (NUL bytes, or more than 1% of its bytes invalid UTF-8): a binary
    file read as text calibrates the model on noise (an executable measured 20.9 bits per byte)."""
    if b"\0" in data:
        problem = "holds NUL bytes"
    else:
        invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
        if invalid <= MAX_INVALID_UTF8 * len(data):
            return
        problem = f"is {invalid / len(data):.0%} invalid UTF-8"
    raise UserError(f"data.paths file {path} {problem}: it is not text",
                    fix="give data.paths text files only (UTF-8): drop the binary file, or convert the text to UTF-8")


def _read(path: Path, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}", fix="fix the file's permissions or drop it from data.paths") from err


def read_tokens(files: list[Path], tokenize, what: str) -> torch.Tensor:
    ids: list[torch.Tensor] = []
    for path in files:
        data = _read(path)
        check_text(path, data)
        ids.append(tokenize(data.decode("utf-8", errors="replace")))
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


def _check_counts(data_cfg) -> None:
    for key, needs in (("num_samples", "calibration needs at least one sample"),
                       ("seq_len", "a sample needs at least one token"), ("batch_size", "a batch needs at least one sample")):
        if getattr(data_cfg, key) < 1:
            raise UserError(f"data.{key}={getattr(data_cfg, key)}: {needs}", fix=f"set data.{key} to 1 or more")


def check_data(data_cfg, vocab_size: int, ckpt_dir: str | None, max_seq_len: int) -> None:
    """What can be known of the data before the run, reading little: the counts, data.seq_len against the
    model's max_seq_len, the tokenizer's file, every text file present and text (its first 64 KiB)."""
    _check_counts(data_cfg)
    if data_cfg.seq_len > max_seq_len:
        raise UserError(f"data.seq_len={data_cfg.seq_len} is longer than the model's max_seq_len={max_seq_len}",
                        fix=f"set data.seq_len to at most {max_seq_len}")
    if data_cfg.name == "synthetic":
        return
    tokenizer_file(data_cfg.tokenizer, ckpt_dir, vocab_size)
    files = _text_files(list(data_cfg.paths))
    if not files:
        raise UserError("data.paths lists no readable file", fix="give existing text files or globs")
    for path in files:
        check_text(path, _read(path, SNIFF_BYTES))


def make_batches(data_cfg, vocab_size: int, ckpt_dir: str | None, heldout_samples: int) -> Batches:
    """The calibration batches and the held-out batches, the same for the same seed on every rank."""
    _check_counts(data_cfg)
    gen = torch.Generator().manual_seed(data_cfg.seed)
    if data_cfg.name == "synthetic":
        calib = torch.randint(0, vocab_size, (data_cfg.num_samples, data_cfg.seq_len), generator=gen)
        heldout = torch.randint(0, vocab_size, (heldout_samples, data_cfg.seq_len), generator=gen)
        return Batches(_batch(calib, data_cfg.batch_size), _batch(heldout, data_cfg.batch_size) if heldout_samples else [])
    tokenizer = load_tokenizer(data_cfg.tokenizer, ckpt_dir, vocab_size)
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
