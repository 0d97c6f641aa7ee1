"""Write a checkpoint of the 671B layer geometry with a few layers, drawn on the device piece by piece with the
rule of ``model.random_weights`` (so a streamed run from it gives the amax of the on-device draw), and drop it
from the page cache, so that a streamed run then reads it from the disk (benchmarks/NOTES.md).

    python -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice --layers 3 --dense 1
    python -m deepseek_ptq.devtools.slice_checkpoint --out /tmp/slice32 --config ds_v32_slice   # V3.2 (the indexer)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import shard_name
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.pieces import Ends, LayerPiece
from deepseek_ptq.model.synthetic import init_random_


def drop_from_page_cache(path: Path) -> None:
    """Written pages flushed, then released: the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@torch.no_grad()
def write_slice(out: Path, layers: int, dense: int, seed: int, device: torch.device,
                config: str = "ds_v3_slice") -> dict[str, float]:
    args = ModelArgs.from_dict({**ModelArgs.from_json(PACKAGED / f"{config}.json").to_dict(),
                                "n_layers": layers, "n_dense_layers": dense})
    par = Parallel()
    state: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for make in [lambda: Ends(args, par)] + [lambda i=i: LayerPiece(args, i, par) for i in range(layers)]:
        with torch.device(device):
            piece = make()
        init_random_(piece, seed)
        state.update({k: v.cpu() for k, v in piece.state_dict().items()})
        del piece
    drawn = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    path = out / shard_name(0, 1)
    start = time.perf_counter()
    save_file(state, str(path))
    drop_from_page_cache(path)
    written = time.perf_counter() - start
    (out / "config.json").write_text(json.dumps(args.to_dict(), indent=2))
    size = path.stat().st_size
    return {"bytes": size, "draw_s": drawn, "write_s": written, "write_gb_per_s": size / written / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dense", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="ds_v3_slice", choices=("ds_v3_slice", "ds_v32_slice"))
    a = parser.parse_args()
    print(json.dumps(write_slice(a.out, a.layers, a.dense, a.seed, torch.device(a.device), a.config)))


if __name__ == "__main__":
    main()
