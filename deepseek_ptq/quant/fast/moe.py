"""A calibration-time MoE forward: grouped expert GEMMs, per-expert amax by segment max, no host sync per expert.

During max calibration every modelopt quantizer only observes: it returns its input unchanged and keeps a
running max of |input|. Weights do not change, and modelopt's weight-only pass has seen each one already, so
the plain path's statistics (model/moe.py ``MoE.routed``: one call per expert, every quantizer collecting) come out the same
from far less work:
  * expert weights: nothing more to do (a running max of the same tensor again is a no-op);
  * w1/w3 inputs: max |x| over each expert's routed tokens; w2 inputs: max |h| of its SwiGLU intermediate.
    Both are segment maxima over the routings sorted by expert, kept on the device across batches and merged
    into each quantizer's calibrator once, at the end (``ExpertStats.flush``), with modelopt's own checks.
  * all-experts mode: every local expert's w1/w3 input is the whole batch (its max is max |x|), and its w2
    input amax needs only the w1/w3 GEMMs of all tokens: the w2 GEMM's output is discarded, so it is skipped.
    Partial forced routing (quant/forced_routing.py) does the same over each expert's statistics tokens.
The routed output is the plain path's, operation for operation: the same bf16 products, and each token's
weighted expert outputs summed one by one in ascending expert order, as the plain path's index_add_ does.
On the CPU every amax is bit-identical to the plain path (tests/test_fast_path.py); on a GPU one grouped GEMM
may round differently from one cuBLAS call per expert (benchmarks/NOTES.md gives the measured gap).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepseek_ptq.model.moe import MoE
from deepseek_ptq.model.parallel import Linear
from deepseek_ptq.quant.fast.options import FastOptions, Grouped
from deepseek_ptq.quant.fast.running_max import NOTHING_SEEN, merge_into_calibrators
from deepseek_ptq.quant.forced_routing import forced_experts


@functools.cache
def _triton(name: str) -> Callable | None:
    """A kernel of model/triton_kernels.py, or None where Triton does not import."""
    try:
        from deepseek_ptq.model import triton_kernels
    except Exception:  # no triton (CPU machines) or a broken install: the torch path is exact too
        return None
    return getattr(triton_kernels, name)


def dequant_into(linear: Linear, out: torch.Tensor) -> None:
    """``linear.dequantized_weight()`` written into ``out`` (the same kernel or the same torch ops: same bits)."""
    kernel = _triton("fp8_block_dequant") if linear.scale is not None and out.is_cuda else None
    if kernel is not None:
        kernel(linear.weight, linear.scale, out.dtype, out=out)
    else:
        out.copy_(linear.dequantized_weight())


def stacked_expert_weights(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's experts of one layer as (w13 [E, 2I, dim]: w1 rows then w3 rows, w2 [E, dim, I])."""
    experts = [expert for _, expert in moe.local_experts()]
    first = experts[0].w1
    inter, dim = first.out_features, first.in_features
    kw = {"dtype": first.compute_dtype, "device": first.weight.device}
    w13 = torch.empty(len(experts), 2 * inter, dim, **kw)
    w2 = torch.empty(len(experts), dim, inter, **kw)
    for e, expert in enumerate(experts):
        dequant_into(expert.w1, w13[e, :inter])
        dequant_into(expert.w3, w13[e, inter:])
        dequant_into(expert.w2, w2[e])
    return w13, w2


def stacked_bytes(moe: MoE) -> int:
    """Bytes ``stacked_expert_weights`` allocates for this layer."""
    first = moe.experts[moe.experts_start].w1
    size = torch.empty((), dtype=first.compute_dtype).element_size()
    return 3 * (moe.experts_end - moe.experts_start) * first.out_features * first.in_features * size


@dataclass
class ExpertStats:
    """Running max |input| of each local expert, float32 on the device; -inf until the expert sees a token.

    Slot ``n_local`` (one past the last expert) takes the routings to other ranks' experts and is ignored.
    """

    w13: torch.Tensor  # input of w1 and w3 (the same tensor)
    w2: torch.Tensor

    @classmethod
    def empty(cls, n_local: int, device: torch.device) -> ExpertStats:
        def make() -> torch.Tensor:
            return torch.full((n_local + 1,), NOTHING_SEEN, dtype=torch.float32, device=device)
        return cls(make(), make())

    def flush(self, moe: MoE, dtype: torch.dtype, name: str = "") -> None:
        """Merge into each local expert's input calibrators (``dtype``: the inputs' dtype), then start afresh.

        ``name``: the layer's module name, for the report of a non-finite statistic."""
        n_local = moe.experts_end - moe.experts_start
        experts = [expert for _, expert in moe.local_experts()]
        targets = ([[e.w1.input_quantizer, e.w3.input_quantizer] for e in experts]
                   + [[e.w2.input_quantizer] for e in experts])
        names = ([f"{name}.experts.{i}.w1.input_quantizer" for i, _ in moe.local_experts()]
                 + [f"{name}.experts.{i}.w2.input_quantizer" for i, _ in moe.local_experts()])
        merge_into_calibrators(targets, torch.cat([self.w13[:n_local], self.w2[:n_local]]), dtype, names)
        self.w13.fill_(NOTHING_SEEN)
        self.w2.fill_(NOTHING_SEEN)


def _segment_max_(acc: torch.Tensor, segment: torch.Tensor, values: torch.Tensor) -> None:
    acc.scatter_reduce_(0, segment, values.float(), reduce="amax")


def moe_combine_torch(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = bf16 sum over j (in order, from 0) of out[pos[t, j]] * weights[t, j]; pos < 0 adds nothing."""
    y = torch.zeros(pos.shape[0], out.shape[1], dtype=out.dtype, device=out.device)
    for j in range(pos.shape[1]):
        rows = out.index_select(0, pos[:, j].clamp_min(0)) * weights[:, j, None]
        y += torch.where((pos[:, j] >= 0).unsqueeze(-1), rows, 0)
    return y


def _fresh_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))


@functools.cache
def triton_combine_is_exact(device: torch.device) -> bool:
    """The Triton combine against the torch ops on fresh random data on ``device`` (a few milliseconds, once)."""
    kernel = _triton("moe_combine")
    if kernel is None:
        return False
    gen = _fresh_generator(device)
    rows, dim, tokens, k = 4096, 2048, 1024, 8
    out = (torch.randn(rows, dim, generator=gen, device=device) * 3).bfloat16()
    pos = torch.randint(-1, rows, (tokens, k), generator=gen, device=device)
    weights = torch.rand(tokens, k, generator=gen, device=device).bfloat16()
    try:
        return bool(torch.equal(kernel(out, pos, weights), moe_combine_torch(out, pos, weights)))
    except Exception:  # a kernel that does not compile or run here: the torch ops do the work
        return False


def uses_triton_combine(device: torch.device, combine: str) -> bool:
    """Whether ``moe_combine(..., combine)`` runs the Triton kernel for bf16 outputs on ``device``."""
    return device.type == "cuda" and (combine == "triton" or (combine == "auto" and triton_combine_is_exact(device)))


def moe_combine(out: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, combine: str = "auto") -> torch.Tensor:
    """The combine in one Triton kernel on a GPU (one read of the expert outputs), else the torch ops
    (``combine``: FastOptions.combine)."""
    use_kernel = out.dtype == torch.bfloat16 and uses_triton_combine(out.device, combine)
    return _triton("moe_combine")(out, pos, weights) if use_kernel else moe_combine_torch(out, pos, weights)


def swiglu_absmax_torch(a1: torch.Tensor, a3: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |silu(a1) * a3| as the plain path's w2 input quantizer sees it (torch's ops, each result in a1's dtype);
    ``dim``: one per slice along it, else one over all."""
    return torch.linalg.vector_norm(F.silu(a1) * a3, float("inf"), dim=dim)


@functools.cache
def triton_swiglu_is_exact(device: torch.device) -> bool:
    """The Triton SwiGLU amax against torch's ops on fresh random data on ``device`` (8,192 maxima of 128 values,
    magnitudes from 1e-4 to 300: exp's whole range and its overflow; a few milliseconds, once)."""
    kernel = _triton("swiglu_absmax")
    if kernel is None:
        return False
    gen = _fresh_generator(device)
    scale = torch.logspace(-4, 2.5, 8192, device=device)[:, None]
    a1, a3 = ((torch.randn(8192, 128, generator=gen, device=device) * scale).bfloat16() for _ in range(2))
    try:
        got = kernel(a1, a3, segment_rows=1, block_rows=1, block_cols=128).view(torch.float32).to(torch.bfloat16)
        return bool(torch.equal(got, swiglu_absmax_torch(a1, a3, dim=1)))
    except Exception:  # a kernel that does not compile or run here: the torch ops do the work
        return False


def uses_triton_swiglu(device: torch.device, swiglu: str) -> bool:
    """Whether the all-experts w2 input amax on ``device`` is the Triton kernel's (``swiglu``: FastOptions.swiglu)."""
    return device.type == "cuda" and (swiglu == "triton" or (swiglu == "auto" and triton_swiglu_is_exact(device)))


def swiglu_maxima(pairs: Iterable[tuple[torch.Tensor, int]], count: int, w13: torch.Tensor,
                  use_kernel: bool) -> torch.Tensor:
    """For each of ``count`` (tokens x, expert) pairs, max |silu(x w1^T) * (x w3^T)| in x's dtype: the w2 input
    amax of the plain path's calls (its two F.linear calls per expert, then torch's ops, or one Triton kernel that
    reads the two GEMM outputs once and writes nothing: bf16 only). ``pairs`` is consumed one at a time: a
    generator holds one expert's tokens at a time."""
    inter = w13.shape[1] // 2
    if use_kernel:
        bits = torch.zeros(count, dtype=torch.int32, device=w13.device)
        for i, (x, e) in enumerate(pairs):
            _triton("swiglu_absmax")(F.linear(x, w13[e, :inter]), F.linear(x, w13[e, inter:]), out=bits[i:i + 1])
        return bits.view(torch.float32).to(torch.bfloat16)
    return torch.stack([swiglu_absmax_torch(F.linear(x, w13[e, :inter]), F.linear(x, w13[e, inter:]))
                        for x, e in pairs])


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| of each row in x's dtype, in one pass (no |x| temporary); the same value as x.abs().amax(-1)."""
    return torch.linalg.vector_norm(x, float("inf"), dim=-1)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, layout: str) -> torch.Tensor:
    """Rows [ends[g-1], ends[g]) of x times w[g]^T (rows past ends[-1] are left unwritten): [rows, out].

    ``layout``: Grouped.layout (quant/fast/options.py)."""
    if layout == "weights_m":
        return torch._grouped_mm(w, x.t(), offs=ends).t()
    return torch._grouped_mm(x, w.transpose(1, 2), offs=ends)


def routed_forward(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, stats: ExpertStats | None,
                   grouped: Grouped = Grouped(), combine: str = "auto") -> torch.Tensor:
    """This rank's part of the routed experts' output (before the all-reduce), as ``MoE.routed`` computes it."""
    num_tokens, topk = indices.shape
    n_local = moe.experts_end - moe.experts_start
    inter = w2.shape[-1]
    # Each token's slots in ascending expert order: the order in which the plain path adds them up.
    indices, slot_order = indices.sort(dim=1)
    weights = weights.gather(1, slot_order)
    expert = indices.reshape(-1)
    local = (expert >= moe.experts_start) & (expert < moe.experts_end)
    segment = torch.where(local, expert - moe.experts_start, n_local)  # other ranks' experts: slot n_local
    order = torch.argsort(segment, stable=True)  # by expert, tokens ascending within one (as torch.where gives)
    # Group ends for the grouped GEMM, counted with a scatter-add (bincount would wait for the device).
    sizes = torch.zeros(n_local + 1, dtype=torch.int64, device=x.device).scatter_add_(0, segment, torch.ones_like(segment))
    ends = sizes[:n_local].cumsum(0).to(torch.int32)
    rows = order.numel()
    padded = max(rows, n_local * 129) if grouped.pad else rows
    xs = x.new_empty(padded, x.shape[1])
    torch.index_select(x, 0, order // topk, out=xs[:rows])
    a = grouped_linear(xs, w13, ends, grouped.layout)
    h = x.new_empty(padded, inter)
    torch.mul(F.silu(a[:rows, :inter]), a[:rows, inter:], out=h[:rows])
    out = grouped_linear(h, w2, ends, grouped.layout)[:rows]
    if out.stride(-1) != 1:
        out = out.contiguous()
    sorted_segment = segment.index_select(0, order)
    if stats is not None:
        # Rows past the last local expert hold no result (the grouped GEMM skips them): slot n_local, ignored.
        _segment_max_(stats.w13, segment, row_absmax(x).repeat_interleave(topk))
        _segment_max_(stats.w2, sorted_segment, row_absmax(h[:rows]))
    # Where each slot's output row is (-1: another rank's expert), then the per-token sums.
    pos = torch.empty_like(order).index_copy_(0, order, torch.arange(rows, device=x.device))
    if n_local < moe.n_routed_experts:
        pos = torch.where(local, pos, -1)
    return moe_combine(out, pos.view(num_tokens, topk), weights, combine)


def all_token_stats(x: torch.Tensor, w13: torch.Tensor, stats: ExpertStats, swiglu_kernel: bool = False) -> None:
    """All-experts statistics: every local expert's w1/w3 and w2 input amax over all tokens of ``x``.

    One expert at a time, with the plain path's own GEMM calls (all tokens times w1, then times w3, each an
    F.linear of the same shapes and layouts): the same kernels on the same operands give the same bits, and at
    thousands of tokens each GEMM fills the GPU anyway. (One GEMM over many experts' stacked weights changed
    some amax by up to 18% on an H200: benchmarks/NOTES.md.) The w2 GEMM is skipped: its output is discarded.
    ``swiglu_kernel``: the SwiGLU's amax by the Triton kernel (``swiglu_maxima``). (One GEMM over an expert's
    [w1; w3] gave the two GEMMs' bits on an H100 but was not faster in both of two timings: benchmarks/NOTES.md.)
    """
    if x.shape[0] == 0:
        return
    n_local = w13.shape[0]
    stats.w13[:n_local] = torch.maximum(stats.w13[:n_local], torch.linalg.vector_norm(x, float("inf")).float())
    h_max = swiglu_maxima(((x, e) for e in range(n_local)), n_local, w13, swiglu_kernel)
    torch.maximum(stats.w2[:n_local], h_max.float(), out=stats.w2[:n_local])


def forced_token_stats(moe: MoE, x: torch.Tensor, forced: torch.Tensor, w13: torch.Tensor, stats: ExpertStats,
                       swiglu_kernel: bool = False) -> None:
    """Partial forced routing's statistics: each local expert's w1/w3 and w2 input amax over the tokens that
    ``forced`` ([tokens, k] expert ids, all E) sends it, ascending, by the plain path's GEMM calls (its tokens
    times w1, then times w3, as ``all_token_stats``); one host sync per call, for the group sizes. With every
    expert forced these are all_token_stats' operands and results, bit for bit."""
    k = forced.shape[1]
    n_local = w13.shape[0]
    local = (forced >= moe.experts_start) & (forced < moe.experts_end)
    segment = torch.where(local, forced - moe.experts_start, n_local).flatten()
    order = torch.argsort(segment, stable=True)  # by expert, tokens ascending within one (as torch.where gives)
    sizes = torch.zeros(n_local + 1, dtype=torch.int64, device=x.device).scatter_add_(0, segment, torch.ones_like(segment))
    # no token: its calibrators stay as they are (the plain path makes no call)
    seen = [(e, rows) for e, rows in enumerate((order // k).split(sizes.tolist())[:n_local]) if rows.numel()]
    if not seen:
        return
    x_max = []

    def tokens() -> Iterator[tuple[torch.Tensor, int]]:  # one expert's tokens at a time
        for e, rows in seen:
            xe = x.index_select(0, rows)
            x_max.append(torch.linalg.vector_norm(xe, float("inf")))
            yield xe, e

    h_max = swiglu_maxima(tokens(), len(seen), w13, swiglu_kernel)
    slots = torch.tensor([e for e, _ in seen], device=x.device)
    stats.w13[slots] = torch.maximum(stats.w13[slots], torch.stack(x_max).float())
    stats.w2[slots] = torch.maximum(stats.w2[slots], h_max.float())


class FastMoE:
    """The calibration version of one MoE layer's ``routed``, bound onto the instance while calibration runs."""

    def __init__(self, moe: MoE, all_experts: bool, keep_weights: bool, options: FastOptions, name: str = "",
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                 experts_ratio: float | None = None) -> None:
        """``weights``: the stacked experts when the caller has them already (``stacked_expert_weights``)."""
        self.moe, self.all_experts, self.keep_weights, self.name = moe, all_experts, keep_weights, name
        self.experts_ratio = experts_ratio
        self.grouped = options.grouped(moe.token_counts.is_cuda)
        self.combine = options.combine
        self.swiglu = options.swiglu
        self.stats = ExpertStats.empty(moe.experts_end - moe.experts_start, moe.token_counts.device)
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = weights
        self.dtype: torch.dtype | None = None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._weights is not None:
            return self._weights
        stacked = stacked_expert_weights(self.moe)
        if self.keep_weights:
            self._weights = stacked
        return stacked

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
        """``MoE.routed``'s signature and output; the expert statistics go into ``self.stats``."""
        self.dtype = x.dtype
        w13, w2 = self.weights()
        swiglu_kernel = x.dtype == torch.bfloat16 and uses_triton_swiglu(x.device, self.swiglu)
        if self.experts_ratio is not None:
            forced = forced_experts(self.moe, x, self.experts_ratio)
            if forced is not None:
                forced_token_stats(self.moe, x, forced, w13, self.stats, swiglu_kernel)
        elif self.all_experts:
            all_token_stats(x, w13, self.stats, swiglu_kernel)
        return routed_forward(self.moe, x, weights, indices, w13, w2, self.stats, self.grouped, self.combine)

    def flush(self) -> None:
        if self.dtype is not None:
            self.stats.flush(self.moe, self.dtype, self.name)

    def release(self) -> None:
        self._weights = None
