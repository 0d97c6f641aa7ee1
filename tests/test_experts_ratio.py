"""Partial forced routing (calib.experts_ratio, quant/forced_routing.py): each token's statistics also from the first
ceil(r x E) experts of its gate's ranking, the layer output still top-k's. On the tiny model (E = 16, top-4, 4 groups
of 4, 2 kept): r = 1 is all_experts bit for bit, ceil(r x E) <= 4 is top-k, every amax in between is the max over
each expert's own statistics tokens, recomputed here from the layer inputs; fast and plain paths, W = 1 and 2."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_cfg, run_job
from omegaconf import OmegaConf
from test_layerwise import EVAL, assert_same_run

from deepseek_ptq.devtools.bench import quantizer_amax
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.moe import Gate
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.pipeline.launch import free_port
from deepseek_ptq.pipeline.metrics import RunMetrics
from deepseek_ptq.pipeline.validate import validate
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.forced_routing import statistics_experts
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")
CPU = torch.device("cpu")
NVFP4 = {"name": "nvfp4", "preset": "NVFP4_DEFAULT_CFG", "attn": None, "wo": None, "kv_cache": None, "algorithm": None}


def batches(n: int = 2, batch: int = 2, seq: int = 32, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (batch, seq), generator=gen) for _ in range(n)]


def reference_ranking(gate: Gate, x: torch.Tensor) -> list[list[int]]:
    """Every expert of each token by (top-k first, then kept groups, then dropped groups; score + bias; index),
    written out per token with Python's sort (the scores by the gate's own formula)."""
    selection = (torch.nn.functional.linear(x, gate.weight).sigmoid() + gate.bias).tolist()
    _, topk = gate(x)
    size = len(selection[0]) // gate.n_groups
    out = []
    for t, scores in enumerate(selection):
        groups = [sum(sorted(scores[g * size:(g + 1) * size])[-2:]) for g in range(gate.n_groups)]
        kept = sorted(range(gate.n_groups), key=lambda g: -groups[g])[:gate.topk_groups]
        chosen = set(topk[t].tolist())

        def tier(e: int) -> int:
            return 0 if e in chosen else 1 if e // size in kept else 2
        out.append(sorted(range(len(scores)), key=lambda e: (tier(e), -scores[e], e)))
    return out


def test_gate_ranking_is_top_k_then_kept_groups_then_dropped_groups():
    gate = Gate(TINY)
    gen = torch.Generator().manual_seed(3)
    gate.weight.data = (torch.randn(gate.weight.shape, generator=gen) * 0.1).bfloat16()
    gate.bias.data = torch.randn(gate.bias.shape, generator=gen) * 0.1
    x = torch.randn(64, TINY.dim, generator=gen).bfloat16()
    _, topk = gate(x)
    assert torch.equal(gate.ranked(x, 4), topk) and torch.equal(gate.ranked(x, 1), topk)
    every = gate.ranked(x, TINY.n_routed_experts)
    assert torch.equal(every[:, :4], topk)  # the top-k in forward's own order
    want = reference_ranking(gate, x)
    for t in range(x.shape[0]):
        assert sorted(every[t, :4].tolist()) == sorted(want[t][:4]) and every[t, 4:].tolist() == want[t][4:]
    for k in (5, 8, 11):
        assert torch.equal(gate.ranked(x, k), every[:, :k])  # nested: a larger ratio adds experts, drops none


def test_statistics_experts_per_token():
    assert [statistics_experts(r, 16, 4) for r in (0.01, 0.25, 0.3, 0.5, 1.0)] == [4, 4, 5, 8, 16]
    assert statistics_experts(0.07, 100, 2) == 7  # 0.07 x 100 is 7.000000000000001 in floating point


class Run:
    """One calibration of a fresh tiny model: amax, token counts, every MoE layer's inputs and the block outputs."""

    def __init__(self, ratio: float | None, all_experts: bool = False, fast: bool = True,
                 par: Parallel | None = None, data: list[torch.Tensor] | None = None) -> None:
        model = Transformer(TINY, par or Parallel())
        init_random_(model, 0)
        model.eval()
        self.moe_inputs: dict[int, list[torch.Tensor]] = {}
        self.outputs: list[torch.Tensor] = []
        handles = [moe.register_forward_pre_hook(self._keep_input(i)) for i, moe in model.moe_layers()]
        calibrate(model, build_quant_config(OmegaConf.create(NVFP4), on_cpu=True), data or batches(), all_experts,
                  CPU, False, fast=fast, experts_ratio=ratio, on_output=lambda _, y: self.outputs.append(y.clone()))
        for h in handles:
            h.remove()
        self.model = model
        self.amax = quantizer_amax(model)
        self.counts = {i: moe.token_counts.clone() for i, moe in model.moe_layers()}

    def _keep_input(self, layer: int):
        def keep(_moe, args):
            self.moe_inputs.setdefault(layer, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
        return keep


def different(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    return {"topk": Run(None), "all_experts": Run(None, all_experts=True), "r1": Run(1.0), "r0.25": Run(0.25),
            "r0.5": Run(0.5), "r0.75": Run(0.75), "r0.5-plain": Run(0.5, fast=False), "r1-plain": Run(1.0, fast=False),
            "all_experts-plain": Run(None, all_experts=True, fast=False)}


def test_ratio_one_is_all_experts_bit_for_bit(runs):
    assert not different(runs["all_experts"].amax, runs["r1"].amax)
    assert not different(runs["all_experts-plain"].amax, runs["r1-plain"].amax)
    for counts in runs["r1"].counts.values():  # every expert's quantizers saw every token
        assert counts.tolist() == [2 * 2 * 32] * TINY.n_routed_experts


def test_ratio_within_the_top_k_is_top_k_calibration(runs):
    assert not different(runs["topk"].amax, runs["r0.25"].amax)  # ceil(0.25 x 16) = 4 = top-k
    assert all(torch.equal(runs["topk"].counts[i], runs["r0.25"].counts[i]) for i in runs["topk"].counts)


def test_fast_and_plain_paths_agree_bit_for_bit(runs):
    assert not different(runs["r0.5"].amax, runs["r0.5-plain"].amax)
    assert not different(runs["r1"].amax, runs["r1-plain"].amax)
    assert all(torch.equal(runs["r0.5"].counts[i], runs["r0.5-plain"].counts[i]) for i in runs["r0.5"].counts)


@pytest.mark.parametrize("name", ["r0.5", "r0.75", "r1", "r0.25", "r0.5-plain"])
def test_the_layer_output_stays_top_k(runs, name):
    """Statistics tokens change no hidden state: every layer's inputs and the model's output are top-k's."""
    topk, run = runs["topk"], runs[name]
    assert all(torch.equal(a, b) for a, b in zip(topk.outputs, run.outputs, strict=True))
    for layer, inputs in topk.moe_inputs.items():
        assert all(torch.equal(a, b) for a, b in zip(inputs, run.moe_inputs[layer], strict=True))


@pytest.mark.parametrize("name,k", [("r0.5", 8), ("r0.75", 12)])
def test_expert_input_amax_is_the_max_over_its_statistics_tokens(runs, name, k):
    """Recomputed from each MoE layer's inputs: expert e's w1/w3 input amax is max |x| over the tokens whose
    first k ranked experts hold e, and its token count the number of those tokens (top-k included)."""
    run = runs[name]
    checked = 0
    for layer, moe in run.model.moe_layers():
        x = torch.cat(run.moe_inputs[layer])
        rows = torch.zeros(x.shape[0], TINY.n_routed_experts, dtype=torch.bool)
        for t, order in enumerate(reference_ranking(moe.gate, x)):
            rows[t, order[:k]] = True
        assert run.counts[layer].tolist() == rows.sum(0).tolist()
        assert int(run.counts[layer].sum()) == x.shape[0] * k
        for e in range(TINY.n_routed_experts):
            if rows[:, e].any():
                want = x[rows[:, e]].abs().amax()
                assert torch.equal(run.amax[f"layers.{layer}.ffn.experts.{e}.w1.input_quantizer"], want)
                assert torch.equal(run.amax[f"layers.{layer}.ffn.experts.{e}.w3.input_quantizer"], want)
                checked += 1
    assert checked > 30


def test_a_partial_ratio_lies_between_top_k_and_all_experts(runs):
    """More statistics tokens never lower an amax; r = 0.5 differs from both ends in some expert inputs."""
    topk, half, every = runs["topk"].amax, runs["r0.5"].amax, runs["all_experts"].amax
    experts = [k for k in every if ".experts." in k and "input_quantizer" in k]
    for key in experts:
        if key in topk:
            assert topk[key] <= half[key] <= every[key], key
        assert half[key] <= every[key], key
    assert different({k: half[k] for k in experts}, {k: every[k] for k in experts})
    assert different({k: half[k] for k in topk if k in experts}, {k: topk[k] for k in topk if k in experts})
    weights = [k for k in every if "weight_quantizer" in k]
    assert not different({k: half[k] for k in weights}, {k: every[k] for k in weights})  # weights: no routing


def _rank(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=init_method,
                            timeout=datetime.timedelta(seconds=120))
    try:
        par = Parallel(rank=rank, world_size=world_size, group=dist.group.WORLD)
        data = batches(1)
        result = {}
        for name, ratio, every, fast in (("all_experts", None, True, True), ("r1", 1.0, False, True),
                                         ("r0.5", 0.5, False, True), ("r0.5-plain", 0.5, False, False)):
            run = Run(ratio, all_experts=every, fast=fast, par=par, data=data)
            result[name] = {"amax": run.amax, "counts": run.counts, "inputs": run.moe_inputs,
                            "local": [e for e, _ in run.model.layers[1].ffn.local_experts()]}
            if name == "r0.5":
                result["gates"] = {i: moe.gate.state_dict() for i, moe in run.model.moe_layers()}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned gloo ranks
def test_two_ranks_run_the_tokens_selected_for_their_experts(tmp_path):
    mp.start_processes(_rank, args=(2, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert not different(r["all_experts"]["amax"], r["r1"]["amax"])
        assert not different(r["r0.5"]["amax"], r["r0.5-plain"]["amax"])
    assert ranks[0]["r0.5"]["local"] == list(range(8)) and ranks[1]["r0.5"]["local"] == list(range(8, 16))
    gate = Gate(TINY)
    checked = 0
    for layer, counts in ranks[0]["r0.5"]["counts"].items():
        assert torch.equal(counts, ranks[1]["r0.5"]["counts"][layer])  # the selection is over all E, on every rank
        x = torch.cat(ranks[0]["r0.5"]["inputs"][layer])
        assert torch.equal(x, torch.cat(ranks[1]["r0.5"]["inputs"][layer]))
        gate.load_state_dict(ranks[0]["gates"][layer])
        order = reference_ranking(gate, x)
        for rank, r in enumerate(ranks):
            for e in r["r0.5"]["local"]:
                rows = torch.tensor([e in o[:8] for o in order])
                assert int(counts[e]) == int(rows.sum())
                if rows.any():
                    key = f"layers.{layer}.ffn.experts.{e}.w1.input_quantizer"
                    assert torch.equal(r["r0.5"]["amax"][key], x[rows].abs().amax()), (rank, key)
                    checked += 1
    assert checked > 30


def test_a_run_records_the_ratio_and_its_statistics_tokens(tmp_path, cache_dir):
    run = run_job(tmp_path, ["calib.experts_ratio=0.5", "calib.sync=false"])
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "ok" and m["calib"] == "topk" and m["calib_experts_ratio"] == 0.5
    assert m["calib_sync"] is False and m["counts"]["synced_input_amax"] == 0
    for layer in m["stats"]["expert_tokens"].values():
        assert layer["total"] == m["tokens_calibrated"] * 8  # 8 of the 16 experts a token
    assert "experts_ratio=0.5" in (run / "summary.md").read_text()
    assert RunMetrics.read(run).mode_label == "nvfp4, topk r=0.5, W=1"


def test_streamed_run_with_a_ratio_equals_the_resident_run(tmp_path, cache_dir):
    overrides = [*EVAL, "calib.experts_ratio=0.75"]  # calib=topk: sync on
    resident = run_job(tmp_path / "resident", overrides)
    streamed = run_job(tmp_path / "streamed", [*overrides, "calib.layerwise=true"])
    assert_same_run(resident, streamed)
    assert json.loads((streamed / "metrics.json").read_text())["counts"]["synced_input_amax"] > 0


@pytest.mark.parametrize("overrides,words", [
    (["calib=all_experts", "calib.experts_ratio=0.5"], ["calib=all_experts", "calib=topk calib.experts_ratio=0.5"]),
    (["calib.experts_ratio=0"], ["calib.experts_ratio=0", "(0, 1]"]),
    (["calib.experts_ratio=1.5"], ["calib.experts_ratio=1.5", "(0, 1]"]),
])
def test_bad_ratios_are_refused_before_any_rank(cache_dir, overrides, words):
    with pytest.raises(UserError) as err:
        validate(make_cfg(overrides))
    text = f"{err.value} {err.value.fix}"
    for word in words:
        assert word in text, text
