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
             progress: bool = False) -> dict[str, float]:
    """Mean KL(reference || quantized) of next-token distributions, top-1 agreement, and both models'
    cross-entropy: bits per byte for byte-level vocabularies, nats per token otherwise."""
    kl_sum = agree = ce_ref = ce_quant = 0.0
    n = 0
    for tokens in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        tokens = tokens.to(device)
        targets = tokens[:, 1:].reshape(-1)
        with quantizers_disabled(model):
            ref = _next_token_log_probs(model, tokens)
        quant = _next_token_log_probs(model, tokens)
        kl_sum += float((ref.exp() * (ref - quant)).sum(-1).sum())
        agree += float((ref.argmax(-1) == quant.argmax(-1)).sum())
        ce_ref += float(F.nll_loss(ref, targets, reduction="sum"))
        ce_quant += float(F.nll_loss(quant, targets, reduction="sum"))
        n += targets.numel()
    if n == 0:
        return {}
    out = {"kl": kl_sum / n, "top1_agreement": agree / n, "tokens": n}
    if byte_level:
        out |= {"bpb_ref": ce_ref / n / math.log(2), "bpb_quant": ce_quant / n / math.log(2)}
    else:
        out |= {"ce_ref": ce_ref / n, "ce_quant": ce_quant / n}
    return out


def _next_token_log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, logits=True)[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
