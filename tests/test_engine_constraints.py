"""Engine constraints in the run: the linears engines fuse share one weight amax and one input amax, the pair's max,
before the evaluation (resident and layer-streamed alike), and amax.csv says which values were raised."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_amax, run_job
from test_layerwise import EVAL, assert_same_run

from deepseek_ptq.hf.export import export_run
from deepseek_ptq.quant.engine_constraints import FUSED_MAX, fused_pairs, partner

TINY = ["model=tiny_random"]


def amax_rows(run_dir: Path) -> dict[str, dict[str, str]]:
    with open(run_dir / "stats" / "amax.csv") as f:
        return {r["quantizer"]: r for r in csv.DictReader(f)}


def test_pairs_by_name():
    modules = ["layers.0.attn.wq_a", "layers.0.attn.wkv_a", "layers.0.attn.wq_b", "layers.0.ffn.w1",
               "layers.0.ffn.w2", "layers.0.ffn.w3", "layers.1.ffn.experts.4.w3", "layers.1.ffn.experts.4.w1",
               "layers.1.ffn.shared_experts.w1"]  # the shared experts' w3 is absent here: no pair
    assert fused_pairs(modules) == [("layers.0.attn.wq_a", "layers.0.attn.wkv_a"), ("layers.0.ffn.w1", "layers.0.ffn.w3"),
                                    ("layers.1.ffn.experts.4.w1", "layers.1.ffn.experts.4.w3")]
    assert partner("layers.1.ffn.experts.4.w3") == "layers.1.ffn.experts.4.w1" and partner("layers.0.ffn.w2") is None


@pytest.mark.parametrize("overrides", [["quant.attn=nvfp4"], ["quant=fp8", "quant.attn=fp8"]], ids=["nvfp4", "fp8"])
def test_fused_pairs_share_the_max_before_evaluation(tmp_path, cache_dir, overrides):
    run_dir = run_job(tmp_path, TINY + EVAL + overrides)
    rows, amax = amax_rows(run_dir), load_amax(run_dir)
    modules = sorted({q.rsplit(".", 1)[0] for q in rows})
    pairs = fused_pairs(modules)
    # dense MLP, 3 x (16 experts + shared experts), and wq_a/wkv_a of the 4 layers
    assert len(pairs) == 1 + 3 * 17 + 4
    raised = 0
    for a, b in pairs:
        for role in ("weight", "input"):
            qa, qb = f"{a}.{role}_quantizer", f"{b}.{role}_quantizer"
            assert torch.equal(amax[f"{qa}._amax"], amax[f"{qb}._amax"]), (qa, qb)
            # The fixup leaves weight amax as calibrated (W = 1): the shared value is the max of the two.
            if role == "weight":
                before_a, before_b = float(rows[qa]["amax_before"]), float(rows[qb]["amax_before"])
                assert float(rows[qa]["amax_after"]) == max(before_a, before_b)
                assert (rows[qa]["source"] == FUSED_MAX) == (before_a < before_b)
                assert (rows[qb]["source"] == FUSED_MAX) == (before_b < before_a)
                raised += before_a != before_b
    assert raised > len(pairs) // 2  # most pairs differed: the rule is exercised, not vacuous
    # Every other quantizer keeps its own source; only the raised values say fused_max.
    assert {r["source"] for q, r in rows.items() if q.rsplit(".", 1)[0] not in {m for p in pairs for m in p}} \
        <= {"calibrated", "peer_max", "disabled"}


def test_streamed_run_applies_them_per_layer(tmp_path, cache_dir):
    overrides = TINY + EVAL + ["quant.attn=nvfp4"]
    resident = run_job(tmp_path / "resident", overrides)
    streamed = run_job(tmp_path / "streamed", [*overrides, "calib.layerwise=true"])
    assert_same_run(resident, streamed)  # amax, amax.csv (sources included) and the evaluation bit for bit
    assert FUSED_MAX in (streamed / "stats" / "amax.csv").read_text()


def test_export_of_a_run_without_them_warns_and_shares_the_max(tmp_path, cache_dir, caplog):
    """A run made before the rule was applied in the run: its pairs differ, the export shares the max and says
    that the run's evaluation is not of the exported model."""
    run_dir = tmp_path / "old"
    shutil.copytree(run_job(tmp_path / "new", TINY), run_dir)
    path = next((run_dir / "amax").glob("*.pt"))
    amax = torch.load(path)
    key = "layers.2.ffn.experts.3.w3.weight_quantizer._amax"
    amax[key] = amax[key] / 2  # as an old run left the smaller one
    torch.save(amax, path)
    logger = logging.getLogger("deepseek_ptq.hf.export")
    logger.addHandler(caplog.handler)  # the run configured logging: its records may not reach the root
    try:
        out = export_run(run_dir, tmp_path / "hf", progress=False)
    finally:
        logger.removeHandler(caplog.handler)
    assert "1 fused linears" in caplog.text and "layers.2.ffn.experts.3.w3" in caplog.text
    from safetensors import safe_open

    scales = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            scales |= {k: f.get_tensor(k) for k in f.keys() if "experts.3." in k and k.endswith("weight_scale_2")}
    gate, up = (scales[f"model.layers.2.mlp.experts.3.{p}.weight_scale_2"] for p in ("gate_proj", "up_proj"))
    assert torch.equal(gate, up) and torch.equal(gate, amax["layers.2.ffn.experts.3.w1.weight_quantizer._amax"].float() / 2688)
