"""The fast-vs-plain diagnosis on the tiny model (CPU): both paths agree, and its recomputation is exact."""

from __future__ import annotations

import torch

from deepseek_ptq.devtools.fast_vs_plain import run


def test_fast_vs_plain_on_cpu_agree_and_recomputation_matches():
    overrides = ["model=tiny", "data=text", "data.num_samples=8", "data.seq_len=64", "data.batch_size=4"]
    result = run(overrides, ["all_experts"], n_batches=2, device=torch.device("cpu"), recompute=4)
    mode = result["modes"]["all_experts"]
    assert mode["amax_compared"] > 300 and mode["amax_identical"] == mode["amax_compared"]
    for row in mode["layers"]:
        assert row["tokens_input_differs"] == 0 and row["tokens_routing_differs"] == 0
        assert all(v["differ"] == 0 for v in row["amax"].values())
        # the all-token w2-input amax recomputed from the captured inputs is the plain run's own, bit for bit
        assert row["w2_control"]["plain"] == row["w2_control"]["from_plain_inputs"]
