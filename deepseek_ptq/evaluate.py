"""What quantization does to the output: the fake-quantized model against the unquantized one on
held-out batches never used in calibration.

Both forwards run on every rank (the model is sharded; the head gathers full logits everywhere), so every
rank computes the same figures and no rank skips a collective.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn
from tqdm import tqdm


@contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[None]:
    """The unquantized reference: the same modules with every enabled quantizer switched off."""
    enabled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for q in enabled:
        q.disable()
    try:
        yield
    finally:
        for q in enabled:
            q.enable()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], device: torch.device, byte_level: bool,
             progress: bool = False) -> dict[str, float | None]:
    """Mean KL(reference || quantized) of next-token distributions, top-1 agreement, and both models'
    cross-entropy: bits per byte for byte-level vocabularies, nats per token otherwise.

    ``kl_se`` and ``*_delta_se`` are standard errors over the held-out sequences (the delta is paired: quantized
    minus reference on the same sequence), so a difference between runs can be told from sampling noise.
    """
    kl_seq, ref_seq, quant_seq = [], [], []
    agree = 0.0
    n = 0
    for tokens in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        tokens = tokens.to(device)
        targets = tokens[:, 1:].reshape(-1)
        with quantizers_disabled(model):
            ref = _next_token_log_probs(model, tokens)
        quant = _next_token_log_probs(model, tokens)
        per_seq = (tokens.shape[0], -1)
        kl_seq.append((ref.exp() * (ref - quant)).sum(-1).reshape(per_seq).mean(1))
        ref_seq.append(F.nll_loss(ref, targets, reduction="none").reshape(per_seq).mean(1))
        quant_seq.append(F.nll_loss(quant, targets, reduction="none").reshape(per_seq).mean(1))
        agree += float((ref.argmax(-1) == quant.argmax(-1)).sum())
        n += targets.numel()
    if n == 0:
        return {}
    kl, ce_ref, ce_quant = (torch.cat(v).double().cpu() for v in (kl_seq, ref_seq, quant_seq))
    unit, scale = ("bpb", 1 / math.log(2)) if byte_level else ("ce", 1.0)
    return {"kl": float(kl.mean()), "kl_se": _standard_error(kl), "top1_agreement": agree / n, "tokens": n,
            "sequences": len(kl), f"{unit}_ref": float(ce_ref.mean()) * scale,
            f"{unit}_quant": float(ce_quant.mean()) * scale, f"{unit}_delta": float((ce_quant - ce_ref).mean()) * scale,
            f"{unit}_delta_se": _scaled(_standard_error(ce_quant - ce_ref), scale)}


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _standard_error(per_sequence: torch.Tensor) -> float | None:
    if len(per_sequence) < 2:
        return None  # undefined for one sequence (None, not NaN: metrics.json stays strict JSON)
    return float(per_sequence.std() / math.sqrt(len(per_sequence)))


def _next_token_log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, logits=True)[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
