"""Convert a Hugging Face DeepSeek-V3/R1/V3.1 or Kimi-K2 checkpoint into DeepSeek's ``model{rank}-mp{W}.safetensors`` shards.

    python scripts/convert_hf.py HF_DIR --out DIR --mp W

Renames follow DeepSeek's converter (``hf_names``), sharding follows ``model.checkpoint`` (column-parallel
weights split dim 0, row-parallel dim 1, routed experts whole on their rank), and the multi-token-prediction
layer (index ``num_hidden_layers``) is skipped. Memory stays bounded: every output shard is laid out from the
input headers first, then the input files are read one at a time, each tensor only in the parts a rank needs.
Writes ``config.json`` with ModelArgs field names and copies the tokenizer files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from deepseek_ptq.errors import UserError
from deepseek_ptq.files import atomic_output_dir, check_new_output
from deepseek_ptq.hf.names import args_from_hf_config, from_hf, hf_layer_index
from deepseek_ptq.hf.safetensors_io import INDEX_NAME, PlannedFile
from deepseek_ptq.model.args import ModelArgs, refuse_compressed_weights
from deepseek_ptq.model.checkpoint import expert_of, shard_name, split_dim
from deepseek_ptq.model.kernels import BLOCK
from deepseek_ptq.model.safetensors_file import open_safetensors

log = logging.getLogger(__name__)
_REDOWNLOAD = "download the file again: the Hugging Face checkpoint is incomplete or damaged"
# The files beside the weights that the converter and the export carry over. Kimi-K2 ships tiktoken.model and its
# loader (tokenization_kimi.py, named by tokenizer_config.json) instead of tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tiktoken.model", "tokenization_kimi.py")


@dataclass(frozen=True)
class _Part:
    """Where one rank's part of a tensor lies: the whole tensor (dim None) or [start, end) along dim."""

    dim: int | None
    start: int = 0
    end: int = 0


def hf_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files, from its index when there is one."""
    index = hf_dir / INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (hf_dir / n).exists()]
        if missing:
            raise UserError(f"{hf_dir} lacks {len(missing)} files its index names, first {missing[0]}",
                            fix="finish downloading the checkpoint")
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir} holds no .safetensors files", fix="point at a Hugging Face DeepSeek-V3 checkpoint folder")
    return files


def rank_parts(key: str, shape: list[int], dtype: str, args: ModelArgs, world_size: int) -> dict[int, _Part]:
    """Each rank's part of a tensor (ranks that hold none are absent)."""
    expert = expert_of(key)
    if expert is not None:
        return {expert // (args.n_routed_experts // world_size): _Part(None)}
    dim = split_dim(key)
    if dim is None or world_size == 1:
        return dict.fromkeys(range(world_size), _Part(None))
    size = shape[dim]
    if size % world_size:
        raise UserError(f"{key} of shape {shape} does not split across {world_size} ranks",
                        fix="choose an --mp that divides the model's dimensions")
    part = size // world_size
    if dtype == "F8_E4M3" and part % BLOCK:
        raise UserError(f"{key}: {size} / {world_size} is not a multiple of the {BLOCK}-wide FP8 block",
                        fix="choose an --mp that keeps every shard on a 128 boundary")
    return {r: _Part(dim, r * part, (r + 1) * part) for r in range(world_size)}


def _part_shape(shape: list[int], part: _Part) -> list[int]:
    if part.dim is None:
        return list(shape)
    out = list(shape)
    out[part.dim] = part.end - part.start
    return out


def convert(hf_dir: Path, out: Path, world_size: int, progress: bool = True) -> Path:
    """Write ``model{r}-mp{W}.safetensors`` for every rank plus config.json into ``out``; returns ``out``."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").exists():
        raise UserError(f"{hf_dir} has no config.json", fix="point at a Hugging Face DeepSeek-V3 checkpoint folder")
    if world_size < 1:
        raise UserError(f"--mp {world_size} is not a world size", fix="use a positive number of ranks")
    check_new_output(out)
    hf = json.loads((hf_dir / "config.json").read_text())
    refuse_compressed_weights(hf, str(hf_dir / "config.json"))  # INT4 experts (Kimi-K2-Thinking and later)
    args = args_from_hf_config(hf, source=str(hf_dir / "config.json"))
    args.check_world_size(world_size)
    files = hf_files(hf_dir)

    # Plan every output shard from the input headers alone.
    layouts: list[dict[str, tuple[str, list[int]]]] = [{} for _ in range(world_size)]
    work: dict[Path, list[tuple[str, str, dict[int, _Part]]]] = {}
    unknown, skipped = [], 0
    for path in files:
        with open_safetensors(path, _REDOWNLOAD) as f:
            for hf_key in f.keys():
                layer = hf_layer_index(hf_key)
                if layer is not None and layer >= args.n_layers:
                    skipped += 1  # the multi-token-prediction layer
                    continue
                key = from_hf(hf_key)
                if key is None:
                    unknown.append(hf_key)
                    continue
                tensor_slice = f.get_slice(hf_key)
                shape, dtype = list(tensor_slice.get_shape()), tensor_slice.get_dtype()
                parts = rank_parts(key, shape, dtype, args, world_size)
                for rank, part in parts.items():
                    layouts[rank][key] = (dtype, _part_shape(shape, part))
                work.setdefault(path, []).append((hf_key, key, parts))
    if unknown:
        raise UserError(f"{len(unknown)} tensors have no DeepSeek-V3 name: {', '.join(sorted(unknown)[:5])}",
                        fix="convert a Hugging Face DeepSeek-V3/R1/V3.1 checkpoint")
    log.info("%d tensors to convert into %d shards, %d multi-token-prediction tensors skipped",
             sum(len(w) for w in work.values()), world_size, skipped)

    with atomic_output_dir(out) as tmp:
        shards = [PlannedFile(tmp / shard_name(r, world_size), layouts[r]) for r in range(world_size)]
        for path in tqdm(files, desc="convert", unit="file", disable=not progress):
            with open_safetensors(path, _REDOWNLOAD) as f:
                for hf_key, key, parts in work.get(path, []):
                    whole = None
                    for rank, part in parts.items():
                        if part.dim is None:
                            whole = f.get_tensor(hf_key) if whole is None else whole
                            shards[rank].write(key, whole)
                        else:
                            index = (slice(None),) * part.dim + (slice(part.start, part.end),)
                            shards[rank].write(key, f.get_slice(hf_key)[index])
        for shard in shards:
            shard.close()
        (tmp / "config.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert_hf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="Hugging Face DeepSeek-V3/R1/V3.1 checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--mp", type=int, default=1, help="model-parallel world size W of the shards (default 1)")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        convert(opts.hf_dir, opts.out, opts.mp)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"converted {opts.hf_dir} -> {opts.out} (mp{opts.mp})", file=sys.stderr)
    return 0
