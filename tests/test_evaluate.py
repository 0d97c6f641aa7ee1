"""score_sequences() and summarize(): per-sequence means and standard errors on the tiny model, quantized with real modelopt."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.observe.evaluate import quantizers_disabled, score_sequences, summarize
from deepseek_ptq.quant.calibrate import calibrate
from deepseek_ptq.quant.recipes import build_quant_config

TINY = ModelArgs.from_json(PACKAGED / "tiny.json")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quantized() -> Transformer:
    model = Transformer(TINY)
    init_random_(model, 0)
    model.eval()
    cfg = OmegaConf.create({"name": "nvfp4", "preset": "NVFP4_DEFAULT_CFG", "attn": None, "wo": None,
                            "kv_cache": None, "algorithm": None})
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, TINY.vocab_size, (4, 32), generator=gen) for _ in range(2)]
    calibrate(model, build_quant_config(cfg, on_cpu=True), calib, False, CPU, False)
    return model


def evaluate(model: Transformer, data: list[torch.Tensor], device: torch.device, byte_level: bool) -> dict:
    return summarize(score_sequences(model, data, device), byte_level)


def _heldout(n_batches: int, batch: int = 3, seq: int = 24) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, TINY.vocab_size, (batch, seq), generator=gen) for _ in range(n_batches)]


def test_standard_errors_over_sequences(quantized: Transformer) -> None:
    data = _heldout(2)
    ev = evaluate(quantized, data, CPU, byte_level=True)
    assert ev["sequences"] == 6 and ev["tokens"] == 6 * 23
    assert ev["kl"] > 0 and 0 < ev["kl_se"] < ev["kl"]
    assert ev["bpb_delta"] == pytest.approx(ev["bpb_quant"] - ev["bpb_ref"], abs=1e-9)
    assert ev["bpb_delta_se"] > 0

    # By hand: the same figures from the per-token values of one forward each.
    kl, delta = [], []
    for tokens in data:
        with quantizers_disabled(quantized):
            ref = torch.log_softmax(quantized(tokens, logits=True)[:, :-1].float(), -1)
        quant = torch.log_softmax(quantized(tokens, logits=True)[:, :-1].float(), -1)
        target = tokens[:, 1:, None]
        kl += (ref.exp() * (ref - quant)).sum(-1).mean(1).tolist()
        delta += ((ref.gather(-1, target) - quant.gather(-1, target)).squeeze(-1).mean(1) / math.log(2)).tolist()
    se = torch.tensor(kl, dtype=torch.float64).std().item() / math.sqrt(6)
    assert ev["kl"] == pytest.approx(sum(kl) / 6, rel=1e-5) and ev["kl_se"] == pytest.approx(se, rel=1e-4)
    assert ev["bpb_delta"] == pytest.approx(sum(delta) / 6, rel=1e-4, abs=1e-7)


def test_unquantized_model_is_its_own_reference(quantized: Transformer) -> None:
    with quantizers_disabled(quantized):
        ev = evaluate(quantized, _heldout(1), CPU, byte_level=False)
    assert ev["kl"] == 0 and ev["kl_se"] == 0 and ev["ce_delta"] == 0 and "bpb_ref" not in ev
    one = evaluate(quantized, _heldout(1, batch=1), CPU, byte_level=False)
    assert one["kl_se"] is None and one["ce_delta_se"] is None  # undefined for one sequence
