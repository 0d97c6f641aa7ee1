"""DeepSeek's converted checkpoint format: ``model{rank}-mp{W}.safetensors`` plus a ModelArgs config JSON.

The release layout: every Linear weight float8_e4m3fn with a float32 128x128 block scale (``release_state``);
embedding, gate, head and norms bf16; gate bias fp32. Sharding follows DeepSeek's converter: column-parallel
weights split dim 0, row-parallel weights dim 1, embedding and head split by vocabulary, routed experts kept
whole on the rank that owns them, the rest replicated. An FP8 weight's ``.scale`` splits with it (the split
falls on a 128-block boundary). ``ShardReader`` is the inverse: whole tensors from the shards of any W.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from deepseek_ptq.common import natural_key
from deepseek_ptq.errors import UserError
from deepseek_ptq.files import atomic_write, write_json
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.kernels import BLOCK, quantize_fp8_blocks
from deepseek_ptq.model.safetensors_file import REPAIR, open_safetensors
from deepseek_ptq.model.transformer import Transformer

log = logging.getLogger(__name__)

_COLUMN = {"wq", "wq_b", "wkv_b", "w1", "w3", "head", "embed"}
_ROW = {"wo", "w2"}
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
SHARD_RE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")


def shard_name(rank: int, world_size: int) -> str:
    return f"model{rank}-mp{world_size}.safetensors"


def split_dim(key: str) -> int | None:
    """The dim a tensor is split along across ranks, or None if replicated (routed experts: None too)."""
    if _EXPERT.search(key) or ".indexer." in key:  # the V3.2 indexer is replicated (its wq_b too)
        return None
    module = key.rsplit(".", 2)[-2]
    if module in _COLUMN:
        return 0
    if module in _ROW:
        return 1
    return None


def expert_of(key: str) -> int | None:
    match = _EXPERT.search(key)
    return int(match.group(1)) if match else None


def shard_state_dict(full: dict[str, torch.Tensor], args: ModelArgs, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part of an unsharded (W = 1) state dict."""
    per_rank = args.n_routed_experts // world_size
    out = {}
    for key, tensor in full.items():
        expert = expert_of(key)
        if expert is not None and not rank * per_rank <= expert < (rank + 1) * per_rank:
            continue
        dim = split_dim(key)
        if dim is not None and world_size > 1:
            if tensor.size(dim) % world_size:
                raise UserError(f"{key} of shape {tuple(tensor.shape)} does not split across {world_size} ranks",
                                fix="choose a world size that divides the model's dimensions")
            if tensor.dtype == torch.float8_e4m3fn and (tensor.size(dim) // world_size) % BLOCK:
                raise UserError(f"{key}: {tensor.size(dim)} / {world_size} is not a multiple of the {BLOCK}-wide FP8 block",
                                fix="choose a world size that keeps every shard on a 128 boundary")
            tensor = tensor.chunk(world_size, dim=dim)[rank]
        out[key] = tensor.contiguous()
    return out


def release_tensor(name: str, value: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One full-precision parameter as stored: FP8 codes plus their block ``.scale``, or cast to ``dtype``."""
    if dtype == torch.float8_e4m3fn:
        codes, scale = quantize_fp8_blocks(value)
        return {name: codes, name.removesuffix("weight") + "scale": scale}
    return {name: value.to(dtype).contiguous()}


@torch.no_grad()
def release_state(full: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Full-precision weights (keys of the bf16 layout) -> the release layout of ``args``."""
    with torch.device("meta"):
        layout = Transformer(args)
    out: dict[str, torch.Tensor] = {}
    for name, param in layout.named_parameters():
        if not name.endswith(".scale"):  # written with its weight
            out.update(release_tensor(name, full[name].detach().float().cpu(), param.dtype))
    return out


def write_shards(full: dict[str, torch.Tensor], args: ModelArgs, ckpt_dir: Path, world_size: int) -> None:
    """Every rank's shard of an unsharded state dict, each written aside and renamed into place."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        shard = shard_state_dict(full, args, rank, world_size)
        atomic_write(ckpt_dir / shard_name(rank, world_size), lambda tmp: save_file(shard, tmp))


def ensure_shards(ckpt_dir: Path, args: ModelArgs, world_size: int, full: Callable[[], dict[str, torch.Tensor]],
                  config: dict[str, Any]) -> Path:
    """``ckpt_dir`` (a cache folder) with this world size's shards of ``full()`` and ``config`` as config.json,
    written on first use, and written again when a file no longer matches the size and digest recorded in the
    completion marker (a truncated or damaged cache is never trusted). Safe when several ranks call it at once:
    every file is written aside and renamed, and ``full()`` gives the same tensors each time."""
    marker = ckpt_dir / cache_marker(world_size)
    if marker.exists():
        problem = cache_problem(ckpt_dir, world_size)
        if problem is None:
            return ckpt_dir
        log.warning("cached checkpoint %s: %s; writing it again", ckpt_dir, problem)
    write_shards(full(), args, ckpt_dir, world_size)
    write_json(ckpt_dir / "config.json", config)
    # Last: the marker says the folder is complete and records what each file must still be.
    write_json(marker, {name: _file_record(ckpt_dir / name) for name in _cached_files(world_size)})
    return ckpt_dir


def cache_marker(world_size: int) -> str:
    return f"complete-mp{world_size}.json"


def _cached_files(world_size: int) -> list[str]:
    return [shard_name(r, world_size) for r in range(world_size)] + ["config.json"]


def _file_record(path: Path) -> dict[str, Any]:
    # The whole file is hashed (about 1 GB/s): a cache folder holds a model small enough to generate or to ship.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def cache_problem(ckpt_dir: Path, world_size: int) -> str | None:
    """What differs between a cache folder and its completion marker for this world size, None when every file
    has the size and digest recorded when it was written."""
    marker = ckpt_dir / cache_marker(world_size)
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{marker.name} is unreadable ({err})"
    for name in _cached_files(world_size):
        path, expected = ckpt_dir / name, recorded.get(name) if isinstance(recorded, dict) else None
        if not isinstance(expected, dict):
            return f"{marker.name} holds no record of {name}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, {expected.get('bytes')} were written"
        if _file_record(path)["sha256"] != expected.get("sha256"):
            return f"{name} differs from what was written (sha256)"
    return None


def find_shards(ckpt_dir: Path) -> dict[int, list[int]]:
    """World sizes present in a folder and the ranks found for each."""
    found: dict[int, list[int]] = {}
    for path in ckpt_dir.glob("model*-mp*.safetensors"):
        match = SHARD_RE.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return found


def pick_world_size(ckpt_dir: Path, preferred: int | None) -> int:
    """The run's world size if its shards are there, else the smallest complete set in the folder."""
    found = find_shards(ckpt_dir) if ckpt_dir.is_dir() else {}
    sizes = sorted(w for w, ranks in found.items() if sorted(ranks) == list(range(w)))
    if preferred in sizes:
        return preferred
    if sizes:
        return sizes[0]
    check_checkpoint(ckpt_dir, preferred or 1)  # raises the clear error for what is missing
    raise AssertionError("unreachable")


def check_checkpoint(ckpt_dir: Path, world_size: int, fix: str = REPAIR) -> None:
    """Fail before building the model when the folder lacks this world size's shards, or one is truncated or
    corrupt (``fix`` says what to do then)."""
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint folder {ckpt_dir} does not exist",
                        fix="set model.ckpt_dir to a folder holding model{rank}-mp{W}.safetensors (see scripts/convert_hf.py)")
    found = find_shards(ckpt_dir)
    if world_size not in found:
        if found:
            have = ", ".join(f"mp{w}" for w in sorted(found))
            raise UserError(f"{ckpt_dir} holds shards for {have}, not for world size {world_size}",
                            fix=f"run with the matching parallel option (parallel={'single' if 1 in found else 'mp' + str(min(found))}) "
                                f"or re-shard the checkpoint for mp{world_size}")
        raise UserError(f"{ckpt_dir} holds no model*-mp*.safetensors shards", fix="convert the checkpoint first")
    missing = sorted(set(range(world_size)) - set(found[world_size]))
    if missing:
        raise UserError(f"{ckpt_dir} lacks {', '.join(shard_name(r, world_size) for r in missing)}",
                        fix="copy or re-create the missing shards")
    for rank in range(world_size):  # headers only (milliseconds): a truncated or corrupt shard fails here
        with open_safetensors(ckpt_dir / shard_name(rank, world_size), fix):
            pass


class ShardFile:
    """One rank's shard, opened once: its header checked against the model's parameters before any tensor is
    read, then tensors copied in by name (all of them, or one layer at a time for streamed calibration).

    ``expected``: name -> (shape, dtype) of every parameter this rank's model holds (a meta-device model gives
    them without memory)."""

    def __init__(self, ckpt_dir: Path, rank: int, world_size: int,
                 expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.path = ckpt_dir / shard_name(rank, world_size)
        self._stack = ExitStack()
        self._file = self._stack.enter_context(open_safetensors(self.path))
        self._check(expected)

    def _check(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        keys = set(self._file.keys())
        missing, unexpected = sorted(set(expected) - keys, key=natural_key), sorted(keys - set(expected), key=natural_key)
        if missing or unexpected:
            raise UserError(f"{self.path.name} does not match the model config: "
                            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
                            fix="use the config JSON that was written with this checkpoint")
        for key, (shape, dtype) in expected.items():
            tensor_slice = self._file.get_slice(key)
            stored = tuple(tensor_slice.get_shape())
            if stored != tuple(shape):
                raise UserError(f"{self.path.name}: {key} has shape {stored}, the model config expects {tuple(shape)}",
                                fix="use the config JSON that was written with this checkpoint")
            fp8 = tensor_slice.get_dtype() == "F8_E4M3"
            if fp8 != (dtype == torch.float8_e4m3fn):
                raise UserError(f"{self.path.name}: {key} is {tensor_slice.get_dtype()}, the model config expects {dtype}",
                                fix="set dtype in the config JSON to match the checkpoint (fp8 or bf16)")

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The stored tensors of ``keys`` (CPU)."""
        return {key: self._tensor(key) for key in keys}

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(key)
        except SafetensorError as err:
            raise UserError(f"{self.path}: {key} cannot be read, corrupt ({err})", fix=REPAIR) from err

    @torch.no_grad()
    def copy_into(self, module: nn.Module, tensors: dict[str, torch.Tensor] | None = None,
                  progress: bool = False) -> None:
        """Copy ``module``'s parameters (their names are the checkpoint's keys) from ``tensors`` or from the file."""
        for key, param in tqdm(list(module.named_parameters()), desc=f"load {self.path.name}", disable=not progress,
                               unit="tensor"):
            tensor = tensors[key] if tensors is not None else self._tensor(key)
            param.data.copy_(tensor.to(param.dtype) if tensor.dtype != param.dtype else tensor,
                             non_blocking=tensor.is_pinned())

    def close(self) -> None:
        self._stack.close()


def expected_params(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}


def load_shard(model: nn.Module, ckpt_dir: Path, rank: int, world_size: int, progress: bool = False) -> None:
    """Copy this rank's shard into the model, checking names, shapes and dtypes first."""
    shard = ShardFile(ckpt_dir, rank, world_size, expected_params(model))
    try:
        shard.copy_into(model, progress=progress)
    finally:
        shard.close()


class ShardReader:
    """Open every rank's shard lazily; ``get(key)`` reads only that tensor's parts."""

    def __init__(self, ckpt_dir: Path, world_size: int) -> None:
        check_checkpoint(ckpt_dir, world_size)
        self.world_size = world_size
        self._stack = ExitStack()
        self._files = [self._stack.enter_context(open_safetensors(ckpt_dir / shard_name(r, world_size)))
                       for r in range(world_size)]
        self._ranks: dict[str, list[int]] = {}
        for rank, f in enumerate(self._files):
            for key in f.keys():
                self._ranks.setdefault(key, []).append(rank)

    def keys(self) -> list[str]:
        return sorted(self._ranks, key=natural_key)

    def __contains__(self, key: str) -> bool:
        return key in self._ranks

    def get(self, key: str) -> torch.Tensor:
        ranks = self._ranks[key]
        dim = split_dim(key)
        if dim is None or self.world_size == 1:
            return self._files[ranks[0]].get_tensor(key)
        if len(ranks) != self.world_size:
            raise UserError(f"{key} is split across ranks but only ranks {ranks} of {self.world_size} hold it",
                            fix="re-create the checkpoint shards")
        return torch.cat([self._files[r].get_tensor(key) for r in range(self.world_size)], dim=dim)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
