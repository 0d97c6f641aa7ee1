"""The calibration text's tokenizer: which file, and how it is read.

A Hugging Face ``tokenizer.json`` (DeepSeek) is read with the ``tokenizers`` package; a tiktoken BPE file
(``tiktoken.model``: Kimi-K2 ships it with ``tokenizer_config.json`` instead of tokenizer.json) with ``tiktoken``;
vocab-256 models without a tokenizer file read UTF-8 bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

import torch

from deepseek_ptq.errors import UserError

TIKTOKEN_FILE = "tiktoken.model"
# Kimi-K2's split pattern (its tokenization_kimi.py): Han runs, words with their case and English contractions,
# up to 3 digits, punctuation runs, newlines, other whitespace.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])
RESERVED_SPECIAL_TOKENS = 256  # Kimi-K2: ids base..base+255 after the BPE ranks (163584 + 256 = its 163840 vocabulary)
# tiktoken's regex panics on very long inputs (tiktoken issue 195): encode at most this many characters at a time,
# with no run of whitespace or of non-whitespace longer than MAX_RUN (Kimi's limits).
MAX_CHARS = 400_000
MAX_RUN = 25_000
_RUN = re.compile(r"\s+|\S+")


class ByteTokenizer:
    """UTF-8 bytes as token ids: the tokenizer of vocab-256 models."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        data = text.encode("utf-8")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else torch.empty(0, dtype=torch.int64)


class HFTokenizer:
    """A Hugging Face tokenizer.json."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self._tok.encode(text).ids, dtype=torch.int64)


class TiktokenTokenizer:
    """A tiktoken BPE file split with Kimi-K2's pattern; the 256 ids after its ranks are special tokens, named by
    ``tokenizer_config.json``'s ``added_tokens_decoder`` beside it (``<|reserved_token_{id}|>`` otherwise).
    Special tokens written in the text encode as themselves, as Kimi's own encode does by default."""

    def __init__(self, path: Path) -> None:
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        base = max(ranks.values()) + 1
        names = _special_token_names(path.parent / "tokenizer_config.json")
        specials = {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(base, base + RESERVED_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=path.name, pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text: str) -> torch.Tensor:
        ids: list[int] = []
        for piece in encodable_pieces(text):
            ids += self.encoding.encode(piece, allowed_special="all")
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """``<base64 token> <rank>`` per line. Read here rather than with tiktoken.load, which caches a local file
    under its path in the temp dir and would read a stale copy after the file changed."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise UserError(f"cannot read tokenizer {path}: {err.strerror}", fix="fix the file's permissions") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            raise UserError(f"tokenizer {path} line {number} is not '<base64 token> <rank>': {line[:60]!r}",
                            fix="point data.tokenizer at a tiktoken BPE file (tiktoken.model) or a tokenizer.json") from err
    if not ranks:
        raise UserError(f"tokenizer {path} holds no tokens", fix="download the checkpoint's tiktoken.model again")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"tokenizer {path}: its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once",
                        fix="download the checkpoint's tiktoken.model again")
    return ranks


def _special_token_names(config: Path) -> dict[int, str]:
    if not config.is_file():
        return {}
    try:
        decoder = json.loads(config.read_text()).get("added_tokens_decoder") or {}
        return {int(i): entry["content"] for i, entry in decoder.items()}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{config}: its added_tokens_decoder is not {{id: {{\"content\": ...}}}} ({err})",
                        fix="download the checkpoint's tokenizer_config.json again") from err


def encodable_pieces(text: str):
    """``text`` cut into pieces of at most MAX_CHARS with no run of whitespace or non-whitespace over MAX_RUN."""
    for start in range(0, len(text), MAX_CHARS):
        chunk = text[start:start + MAX_CHARS]
        cut = 0
        for run in _RUN.finditer(chunk):
            for at in range(run.start() + MAX_RUN, run.end(), MAX_RUN):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


def tokenizer_file(tokenizer_path: str | None, ckpt_dir: str | None, vocab_size: int) -> Path | None:
    """The tokenizer file to load: ``data.tokenizer``, else the checkpoint's tokenizer.json or tiktoken.model;
    None for the byte tokenizer of vocab-256 models that have neither."""
    if tokenizer_path:
        path = Path(tokenizer_path).expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist",
                            fix="set data.tokenizer to the model's tokenizer.json or tiktoken.model")
        return path
    if ckpt_dir:
        for name in ("tokenizer.json", TIKTOKEN_FILE):
            if (Path(ckpt_dir).expanduser() / name).is_file():
                return Path(ckpt_dir).expanduser() / name
    if vocab_size == 256:
        return None
    where = f"{ckpt_dir} holds neither tokenizer.json nor {TIKTOKEN_FILE}" if ckpt_dir else "model.ckpt_dir is not set"
    raise UserError(f"no tokenizer for a vocabulary of {vocab_size}: {where}",
                    fix="set data.tokenizer to the model's tokenizer.json or tiktoken.model (or model.ckpt_dir to a "
                        "folder holding one)")


def load_tokenizer(tokenizer_path: str | None, ckpt_dir: str | None, vocab_size: int):
    """The tokenizer (``encode(text) -> int64 ids``): a ``.json`` file is a Hugging Face tokenizer, any other a
    tiktoken BPE file."""
    path = tokenizer_file(tokenizer_path, ckpt_dir, vocab_size)
    if path is None:
        return ByteTokenizer()
    return HFTokenizer(path) if path.suffix == ".json" else TiktokenTokenizer(path)
