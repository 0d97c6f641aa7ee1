"""DeepSeek's linear classes as modelopt quantized modules.

The quantizers always see the real (dequantized) weight: in the forward, and in modelopt's weight-only
calibration pass, which otherwise reads the raw FP8 codes and calibrates every weight amax to 448
(the reference's fault). Parallel states follow the layer kind: tensor-parallel shards share a group,
replicated layers and routed experts have none, so different experts are never merged.

MLA becomes ``QuantMLA``: two quantizers on what engines keep in the KV cache (model/attention.py,
``cache_entries``), named as in NVIDIA's reference flow (Model-Optimizer examples/deepseek/ptq.py, ``QuantMLA``):
``kv_bmm_quantizer`` on the normalized kv latent, ``pe_bmm_quantizer`` on the rotary key. The rules keep them off
unless ``quant.kv_cache=fp8`` (quant/recipes.py), and a disabled quantizer returns its input as it is.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import TensorQuantizer
from modelopt.torch.utils.distributed import ParallelState

from deepseek_ptq.model.attention import MLA
from deepseek_ptq.model.parallel import ColumnParallelLinear, ExpertLinear, Linear, RowParallelLinear

_NO_GROUP = -1
# The KV cache's quantizers on QuantMLA: (normalized kv latent, rotary key).
KV_CACHE_QUANTIZERS = ("kv_bmm_quantizer", "pe_bmm_quantizer")


class _QuantLinearMixin:
    """Quantizers around a DeepSeek Linear; the all-reduce of a row-parallel layer stays after the GEMM."""

    def _setup(self) -> None:
        self.input_quantizer = TensorQuantizer()
        self.weight_quantizer = TensorQuantizer()
        sharded = self.kind in ("column", "row") and self.par.world_size > 1
        # modelopt reads None as "the whole world": our model-parallel group is the world (or par.group).
        tp_group = self.par.group if sharded else _NO_GROUP
        self._parallel_state = ParallelState(data_parallel_group=_NO_GROUP, tensor_parallel_group=tp_group)
        self._is_column_parallel = self.kind == "column"
        self._is_row_parallel = self.kind == "row"

    def iter_weights_for_calibration(self):
        yield self.dequantized_weight(), self.weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_quantizer(self.dequantized_weight())
        return self.finish(F.linear(self.input_quantizer(x), w))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """What follows the GEMM: the all-reduce of a row-parallel layer, then the bias."""
        if self.kind == "row":
            self.par.all_reduce(y)
        return y if self.bias is None else y + self.bias


class QuantLinear(_QuantLinearMixin, Linear):
    pass


class QuantExpertLinear(_QuantLinearMixin, ExpertLinear):
    pass


class QuantColumnParallelLinear(_QuantLinearMixin, ColumnParallelLinear):
    pass


class QuantRowParallelLinear(_QuantLinearMixin, RowParallelLinear):
    pass


class QuantMLA(MLA):
    """MLA whose KV-cache entries are fake-quantized as an engine's FP8 cache stores them."""

    def _setup(self) -> None:
        self.kv_bmm_quantizer = TensorQuantizer()
        self.pe_bmm_quantizer = TensorQuantizer()
        # Replicated on every rank (wkv_a and kv_norm are not split): no group of modelopt's merges them.
        self._parallel_state = ParallelState(data_parallel_group=_NO_GROUP, tensor_parallel_group=_NO_GROUP)

    def cache_entries(self, kv_latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv_bmm_quantizer(kv_latent), self.pe_bmm_quantizer(k_pe)


@functools.cache
def register() -> None:
    """Tell modelopt how to quantize each DeepSeek linear class (once per process)."""
    import modelopt.torch.quantization as mtq

    for original, quantized in ((Linear, QuantLinear), (ExpertLinear, QuantExpertLinear),
                                (ColumnParallelLinear, QuantColumnParallelLinear),
                                (RowParallelLinear, QuantRowParallelLinear), (MLA, QuantMLA)):
        mtq.register(original_cls=original, quantized_cls=quantized)


def quantized_linears(model: torch.nn.Module):
    """(name, module) of every DeepSeek linear that modelopt converted."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLinearMixin)]


def kv_cache_quantizers(attn: torch.nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """(name, quantizer) of a converted attention's KV-cache quantizers (none for an unconverted one)."""
    return [(key, attn._modules[key]) for key in KV_CACHE_QUANTIZERS if key in attn._modules]
