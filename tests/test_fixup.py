"""The fixup (quant/fixup.py) against a recomputation by hand from every rank's amax before it.

The tiny model is calibrated with real modelopt (NVFP4) at W = 1 and on two real gloo ranks at W = 2; a few
amax are then removed to reach every case (an expert's and a tensor-parallel shard's weight, a TP input on one
rank and on all ranks, one MoE layer's w1 inputs on every rank). Each rank records every quantizer's amax before
and after the fixup, the fixup's report and what ``missing_amax`` says after it; the test derives what the fixup
must produce from the records alone and asserts it bit for bit (values and dtypes), with sync on and off.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from modelopt.torch.quantization.nn import SequentialQuantizer
from omegaconf import OmegaConf

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.pipeline.launch import free_port
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.fixup import fixup, missing_amax
from deepseek_ptq.quant.modules import quantized_linears
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")
CPU = torch.device("cpu")
NVFP4 = {"name": "nvfp4", "preset": "NVFP4_DEFAULT_CFG", "attn": None, "wo": None, "kv_cache": None, "algorithm": None}
EXPERT = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])$")
NO_INPUT_LAYER = 2  # every rank loses layer 2's expert w1 input amax


def _leaves(model: torch.nn.Module) -> dict[str, dict]:
    """Every quantizer leaf: the linear it belongs to, that linear's parallel kind, role, enabled, per-tensor."""
    leaves = {}
    for name, module in quantized_linears(model):
        for role in ("input_quantizer", "weight_quantizer"):
            q = getattr(module, role)
            parts = list(enumerate(q)) if isinstance(q, SequentialQuantizer) else [(None, q)]
            for i, leaf in parts:
                blocks = leaf.block_sizes or {}
                leaves[f"{name}.{role}" + ("" if i is None else f".{i}")] = {
                    "linear": name, "kind": module.kind, "role": role, "enabled": leaf.is_enabled,
                    "per_tensor": leaf.axis is None and (not blocks or blocks.get("type") == "dynamic"),
                    "dynamic": bool(getattr(leaf, "_dynamic", False)), "module": leaf}
    return leaves


def _amax(leaves: dict[str, dict]) -> dict[str, torch.Tensor]:
    return {n: leaf["module"]._amax.detach().clone() for n, leaf in leaves.items()
            if getattr(leaf["module"], "_amax", None) is not None}


def _strip(model: torch.nn.Module, leaves: dict[str, dict], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Remove the amax of the cases calibration on real data does not leave; returns the removed weight amax."""
    first_expert = model.layers[1].ffn.experts_start
    names = [f"layers.{NO_INPUT_LAYER}.ffn.experts.{e}.w1.input_quantizer" for e, _ in
             model.layers[NO_INPUT_LAYER].ffn.local_experts()]
    names.append("layers.3.attn.wo.input_quantizer")  # row parallel, on every rank: no rank has it
    if rank == 0:
        names += [f"layers.1.ffn.experts.{first_expert}.w2.weight_quantizer",  # an expert's weight
                  "layers.0.ffn.w1.weight_quantizer"]  # a column-parallel shard's weight
    if rank == world_size - 1:
        names.append("layers.1.attn.wo.input_quantizer")  # row parallel, on one rank only
    removed = {}
    for n in names:
        if n.endswith("weight_quantizer"):
            removed[n] = leaves[n]["module"]._amax.clone()
        leaves[n]["module"].reset_amax()
    return removed


def run_rank(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    """Calibrate, strip, record, fix up and record again, with sync off then on (a fresh model each)."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=init_method,
                                timeout=datetime.timedelta(seconds=120))
    try:
        par = Parallel(rank=rank, world_size=world_size, group=dist.group.WORLD if world_size > 1 else None)
        gen = torch.Generator().manual_seed(1)
        data = [torch.randint(0, TINY.vocab_size, (1, 3), generator=gen)]  # 3 tokens: some experts get none
        for sync in (False, True):
            model = Transformer(TINY, par)
            init_random_(model, 0)
            model.eval()
            calibrate(model, build_quant_config(OmegaConf.create(NVFP4), on_cpu=True), data, False, CPU, False,
                      fast=False)
            leaves = _leaves(model)
            removed = _strip(model, leaves, rank, world_size)
            before = _amax(leaves)
            weight_max = {leaf["linear"]: model.get_submodule(leaf["linear"]).dequantized_weight().abs().amax()
                          for n, leaf in leaves.items()
                          if leaf["role"] == "weight_quantizer" and leaf["enabled"] and n not in before}
            report = fixup(model, par, sync, CPU)
            torch.save({"before": before, "after": _amax(leaves), "removed": removed, "weight_max": weight_max,
                        "leaves": {n: {k: v for k, v in leaf.items() if k != "module"} for n, leaf in leaves.items()},
                        "report": dataclasses.asdict(report), "missing": missing_amax(model)},
                       Path(out_dir) / f"rank{rank}-sync{sync}.pt")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


@pytest.fixture(scope="module", params=[1, 2], ids=["W1", "W2"])
def records(request, tmp_path_factory) -> tuple[int, Path]:
    world_size, out = request.param, tmp_path_factory.mktemp(f"fixup_w{request.param}")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    if world_size == 1:
        run_rank(0, 1, init_method, str(out))
    else:
        mp.start_processes(run_rank, args=(world_size, init_method, str(out)), nprocs=world_size, join=True,
                           start_method="spawn")
    return world_size, out


def expected(runs: list[dict], sync: bool) -> list[dict]:
    """What the fixup must leave on each rank, from every rank's amax before it."""
    world_size = len(runs)
    want = [{"amax": dict(r["before"]), "sources": {}, "synced": 0, "tp": 0, "no_amax_layers": []} for r in runs]

    def set_amax(w: dict, name: str, value: torch.Tensor) -> None:
        old = w["amax"].get(name)  # an existing amax keeps its dtype; a new one is float32
        w["amax"][name] = value.to(old.dtype if old is not None else torch.float32).reshape(
            old.shape if old is not None else ())

    # Enabled weight quantizers without amax: max |dequantized weight|, as modelopt's max calibration gives.
    for r, w in zip(runs, want):
        for name, leaf in r["leaves"].items():
            if leaf["role"] == "weight_quantizer" and leaf["enabled"] and name not in w["amax"]:
                w["amax"][name] = r["weight_max"][leaf["linear"]]
                w["sources"][name] = "weight_fill"
    # Tensor-parallel shards' per-tensor amax: the max over the ranks that have one (every rank has the name).
    if world_size > 1:
        for name, leaf in runs[0]["leaves"].items():
            if leaf["kind"] in ("column", "row") and leaf["enabled"] and leaf["per_tensor"]:
                have = [w["amax"][name].float() for w in want if name in w["amax"]]
                if have:
                    for w in want:
                        set_amax(w, name, torch.stack(have).max())
                        w["sources"].setdefault(name, "tp_max")
                        w["tp"] += 1
    # With sync: each (MoE layer, w1|w2|w3) input amax is the max over all experts of all ranks.
    if sync:
        groups: dict[tuple[int, str], list[tuple[int, str]]] = {}
        for rank, r in enumerate(runs):
            for name, leaf in r["leaves"].items():
                m = EXPERT.match(leaf["linear"])
                if m and leaf["role"] == "input_quantizer" and leaf["enabled"]:
                    groups.setdefault((int(m[1]), m[3]), []).append((rank, name))
        for (layer, linear), members in sorted(groups.items()):
            have = [want[rank]["amax"][name].float() for rank, name in members if name in want[rank]["amax"]]
            if not have:
                for w in want:
                    w["no_amax_layers"].append(f"layers.{layer}.ffn.experts.*.{linear}")
                continue
            value = torch.stack(have).max()
            for rank, name in members:
                set_amax(want[rank], name, value)
                want[rank]["sources"][name] = "peer_max"
                want[rank]["synced"] += 1
    return want


@pytest.mark.parametrize("sync", [False, True], ids=["nosync", "sync"])
def test_fixup_matches_a_recomputation_from_the_amax_before_it(records, sync):
    world_size, out = records
    runs = [torch.load(out / f"rank{r}-sync{sync}.pt", weights_only=False) for r in range(world_size)]
    for r, (run, want) in enumerate(zip(runs, expected(runs, sync))):
        after, report = run["after"], run["report"]
        assert after.keys() == want["amax"].keys(), (r, after.keys() ^ want["amax"].keys())
        wrong = [n for n in after if not (torch.equal(after[n], want["amax"][n]) and after[n].dtype == want["amax"][n].dtype)]
        assert not wrong, f"rank {r}: {len(wrong)} amax differ, first {[(n, after[n], want['amax'][n]) for n in wrong[:3]]}"
        assert report["sources"] == want["sources"]
        assert report["filled_weight_amax"] == sum(s == "weight_fill" for s in want["sources"].values())
        assert report["tp_synced_amax"] == want["tp"]
        assert report["synced_input_amax"] == want["synced"]
        assert report["layers_without_expert_input_amax"] == want["no_amax_layers"]
        assert report["collectives"] == (1 if world_size > 1 else 0)
        left = {n for n, leaf in run["leaves"].items() if leaf["enabled"] and not leaf["dynamic"] and n not in want["amax"]}
        assert set(run["missing"]) == left

        # The cases the strip set up are all reached (so none of the checks above holds vacuously).
        assert run["removed"].keys() <= {n for n, s in want["sources"].items() if s == "weight_fill"}
        for name, calibrated in run["removed"].items():  # max |dequantized weight| is what calibration gave
            fill = run["weight_max"][name.removesuffix(".weight_quantizer")]
            assert torch.equal(fill, calibrated) and fill.dtype == calibrated.dtype, name
        no_input = {f"layers.{NO_INPUT_LAYER}.ffn.experts.{e}.w1.input_quantizer" for e in range(TINY.n_routed_experts)}
        assert not (no_input & after.keys()) and "layers.3.attn.wo.input_quantizer" not in after
        assert (f"layers.{NO_INPUT_LAYER}.ffn.experts.*.w1" in report["layers_without_expert_input_amax"]) == sync
        experts_without_input = [n for n in left if ".experts." in n and n not in no_input]
        assert bool(experts_without_input) != sync  # some experts saw no token: only the sync gives them an amax
        if world_size > 1:
            assert after["layers.1.attn.wo.input_quantizer"].dtype == (torch.float32 if r == world_size - 1
                                                                        else torch.bfloat16)
            assert want["tp"] > 0 and report["sources"]["layers.0.ffn.w1.weight_quantizer"] == (
                "weight_fill" if r == 0 else "tp_max")
        else:
            assert "layers.1.attn.wo.input_quantizer" in left
        if sync:
            assert want["synced"] == (3 * TINY.n_moe_layers - 1) * TINY.n_routed_experts // world_size
