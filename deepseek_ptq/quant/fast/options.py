"""How the fast calibration path runs: one options object, passed in (no module state anyone mutates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Grouped:
    """How the grouped expert GEMMs are laid out (benchmarks/NOTES.md has the measurements).

    ``layout``: "tokens_m": tokens are the GEMM's rows (2-D x 3-D); "weights_m": each expert's weight rows are
    the GEMM's rows and its tokens the columns (3-D x 2-D, transposed result; on CUDA torch 2.11 requires every
    group's token count to be a multiple of 8, which routing does not give: CPU only). ``pad``: more rows than
    routings, so that torch's heuristic (average group size above 128) picks its large tile. The CPU keeps
    "tokens_m" without padding: there torch runs one mm per group, bit-identical to one F.linear per expert.
    """

    layout: Literal["tokens_m", "weights_m"] = "tokens_m"
    pad: bool = False


@dataclass(frozen=True)
class FastOptions:
    """Options of the fast calibration path (quant/fast/calib.py).

    ``keep_weights``: keep each MoE layer's stacked dequantized experts on the device between batches; None:
    where they fit (device memory less ``reserve_bytes``), True/False: always/never.
    ``combine``: the per-token sum of the expert outputs; "auto": the Triton kernel on a GPU where a check on
    random data finds it bit-identical to the torch ops (once per device), else the torch ops; "triton" /
    "torch" force one.
    ``swiglu``: the w2 input amax of all-experts and forced routing (every local expert's SwiGLU over its
    statistics tokens, whose w2 GEMM is skipped), "auto" / "triton" / "torch" as ``combine``: the Triton kernel
    reads the two GEMM outputs once and writes nothing, where torch's ops make three passes and two temporaries.
    ``grouped_gpu`` / ``grouped_cpu``: the grouped-GEMM layout on each kind of device.
    """

    keep_weights: bool | None = None
    combine: Literal["auto", "triton", "torch"] = "auto"
    swiglu: Literal["auto", "triton", "torch"] = "auto"
    grouped_gpu: Grouped = field(default_factory=Grouped)
    grouped_cpu: Grouped = field(default_factory=Grouped)
    reserve_bytes: int = 12 << 30  # device memory left free for activations when deciding what to keep

    def grouped(self, on_gpu: bool) -> Grouped:
        return self.grouped_gpu if on_gpu else self.grouped_cpu
