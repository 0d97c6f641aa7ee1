"""Compare the amax dicts of two run directories (any world sizes): exact matches and the largest relative gaps.

    python scripts/amax_diff.py RUN_A RUN_B
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def merged(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted((run_dir / "amax").glob("amax_dict_rank*-mp*.pt")):
        out.update(torch.load(path, map_location="cpu"))
    return out


def main(a: str, b: str) -> None:
    da, db = merged(Path(a)), merged(Path(b))
    keys = sorted(set(da) & set(db))
    print(f"keys: {len(da)} vs {len(db)}, shared {len(keys)}")
    for kind in ("weight_quantizer", "input_quantizer"):
        ks = [k for k in keys if kind in k and k.endswith("_amax")]
        same = sum(torch.equal(da[k].float(), db[k].float()) for k in ks)
        rel = sorted(((da[k].float() - db[k].float()).abs().max().item() / max(db[k].float().abs().max().item(), 1e-12), k)
                     for k in ks)
        print(f"{kind}: {same}/{len(ks)} bit-identical; max relative gap {rel[-1][0]:.3g} ({rel[-1][1]})" if ks else kind)


if __name__ == "__main__":
    main(*sys.argv[1:3])
