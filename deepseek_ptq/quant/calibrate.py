"""Calibration: modelopt's quantize over the calibration batches in the chosen MoE mode."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.parallel import Linear
from deepseek_ptq.quant.binding import Bindings
from deepseek_ptq.quant.forced_routing import forced_experts
from deepseek_ptq.quant.nonfinite import NonFiniteActivations, guard_quantizers
from deepseek_ptq.quant.reuse import recalibrate

if TYPE_CHECKING:
    from deepseek_ptq.quant.fast import FastOptions
    from deepseek_ptq.quant.fast.expert_weights import ExpertWeights

log = logging.getLogger(__name__)
# modelopt imports its Hugging Face export code lazily and warns that transformers is missing: this
# project exports nothing through it, so the warning only confuses.
warnings.filterwarnings("ignore", message="Cannot find transformers package")


class _QuantizerCountToLog(io.TextIOBase):
    """stdout while modelopt quantizes: its "Inserted N quantizers" (printed once per rank, this rank's count,
    which the run's own summary supersedes) goes to the log at debug level; any other line passes through."""

    COUNT = re.compile(r"Inserted \d+ quantizers")

    def __init__(self, out: Any) -> None:
        self.out, self._line = out, ""

    def write(self, text: str) -> int:
        self._line += text
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if self.COUNT.fullmatch(line.strip()):
                log.debug("modelopt (this rank's shard): %s", line.strip())
            else:
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line:
            self.out.write(self._line)
            self._line = ""
        self.out.flush()


@contextlib.contextmanager
def quantizer_count_to_log() -> Iterator[None]:
    """Around ``mtq.quantize``: modelopt's per-rank quantizer count off the console (see _QuantizerCountToLog)."""
    quiet = _QuantizerCountToLog(sys.stdout)
    try:
        with contextlib.redirect_stdout(quiet):
            yield
    finally:
        quiet.flush()


@torch.no_grad()
def check_finite_weights(model: nn.Module, stacked: dict[int, ExpertWeights] | None = None) -> None:
    """NaN or inf in a weight is named here, not found later as a NaN amax deep inside modelopt.

    One flag per tensor, read back once (a host sync per tensor costs seconds at 671B scale). ``stacked``:
    experts dequantized already (quant/fast/expert_weights.py), whose max |w| tells."""
    names: list[str] = []
    finite: list[torch.Tensor] = []
    done = {id(linear) for experts in (stacked or {}).values() for linear in experts.linears}
    for experts in (stacked or {}).values():
        names += [f"{n}.weight" for n in experts.names]
        finite.append(torch.isfinite(experts.amax))
    for name, module in model.named_modules():
        if isinstance(module, Linear) and id(module) not in done:
            names.append(f"{name}.weight")
            finite.append(torch.isfinite(module.dequantized_weight()).all().reshape(1))
        elif name.endswith(("norm", "gate", "embed")):
            for p, t in module.named_parameters(recurse=False):
                names.append(f"{name}.{p}")
                finite.append(torch.isfinite(t.float()).all().reshape(1))
    if not finite:
        return
    bad = [n for n, ok in zip(names, torch.cat(finite).tolist()) if not ok]
    if bad:
        raise UserError(f"non-finite values (NaN or inf) in {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}",
                        fix="the checkpoint is corrupt: re-convert or re-download these tensors")


@torch.no_grad()
def first_non_finite_module(model: nn.Module, tokens: torch.Tensor) -> str:
    """Re-run one batch with hooks to name the first module whose output is not finite."""
    found: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point() and not torch.isfinite(output).all():
                found.append(name)
        return check

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model(tokens, logits=False)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "(not reproducible)"


def _stop_statistics(model: nn.Module) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            module.disable_calib()


class PlainCalibration:
    """The plain path: modelopt's quantizers collect in every call; nothing to flush."""

    def flush(self) -> None:
        pass


def _all_tokens_to_every_expert(moe: nn.Module, args: tuple) -> None:
    x = args[0]
    x = x.reshape(-1, x.shape[-1])
    for _, expert in moe.local_experts():
        expert(x)  # output discarded: the quantizers see the whole distribution


def _forced_tokens_to_experts(ratio: float) -> Callable[[nn.Module, tuple], None]:
    def hook(moe: nn.Module, args: tuple) -> None:
        x = args[0]
        x = x.reshape(-1, x.shape[-1])
        forced = forced_experts(moe, x, ratio)
        if forced is None:
            return
        for i, expert in moe.local_experts():
            rows = torch.where((forced == i).any(dim=1))[0]  # its tokens, ascending
            if rows.numel():
                expert(x[rows])  # output discarded, as in all-experts mode
    return hook


@contextlib.contextmanager
def plain_calibration(model: nn.Module, all_experts: bool,
                      experts_ratio: float | None = None) -> Iterator[PlainCalibration]:
    """The plain path for the block. ``all_experts``: before each MoE layer's forward every local expert sees
    every token (its output discarded), so its quantizers see the whole distribution; the layer output then
    comes from the ordinary top-k path, bit-identical to top-k calibration. (The gate has no quantizer and
    max statistics do not depend on the order of the calls.) ``experts_ratio``: the same with each token sent
    to its statistics experts only (quant/forced_routing.py)."""
    bindings = Bindings()
    try:
        if all_experts or experts_ratio is not None:
            hook = _all_tokens_to_every_expert if experts_ratio is None else _forced_tokens_to_experts(experts_ratio)
            for _, moe in model.moe_layers():
                bindings.hook(moe.register_forward_pre_hook(hook))
        yield PlainCalibration()
    finally:
        bindings.restore()


def reset_token_counts(model: nn.Module) -> None:
    for _, moe in model.moe_layers():
        moe.token_counts.zero_()


@torch.no_grad()
def materialize_dequantized_weights(model: nn.Module) -> None:
    """Replace FP8 codes by real weights: search-based algorithms (AWQ) read and rescale ``weight`` directly."""
    for _, module in model.named_modules():
        if isinstance(module, Linear) and module.scale is not None:
            module.weight = nn.Parameter(module.dequantized_weight(), requires_grad=False)
            module.scale = None


def _non_finite_error(where: str) -> UserError:
    return UserError(f"non-finite activations during calibration, first at {where}",
                     fix="check the checkpoint and the compute dtype (model activations overflow)")


def insert_quantizers(model: nn.Module, mtq_cfg: dict[str, Any]) -> None:
    """Convert the model's linears and set their quantizers as the config says, calibrating nothing (the ends of
    a layer-streamed run: the embedding has no quantizer and the rules keep the head's off)."""
    from modelopt.torch.opt import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry

    from deepseek_ptq.quant import modules

    modules.register()
    with quantizer_count_to_log():
        apply_mode(model, mode=[("quantize", dict(mtq_cfg))], registry=QuantizeModeRegistry)


@contextlib.contextmanager
def _one_piece_of_the_model() -> Iterator[None]:
    """modelopt refuses a model in which no weight quantizer is enabled; one layer of a streamed run may rightly
    have none (a recipe for the experts only, on a dense layer). The stream checks the whole model itself."""
    key = "MODELOPT_SKIP_WEIGHT_QUANT_CHECK"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def calibrate(model: nn.Module, mtq_cfg: dict[str, Any], batches: list[torch.Tensor], all_experts: bool,
              device: torch.device, progress: bool, on_batch: Callable[[int], None] | None = None,
              fast: bool = True, fast_options: FastOptions | None = None,
              on_output: Callable[[int, torch.Tensor], None] | None = None, piece: bool = False,
              phases: dict[str, float] | None = None, converted: bool = False,
              experts_ratio: float | None = None) -> float:
    """Quantize the model in place with modelopt, calibrating on ``batches``; returns the seconds spent.

    ``fast``: the grouped-GEMM path of quant/fast/ where the format allows it (same amax as the plain
    path, one modelopt call per expert, which ``fast=False`` forces); ``fast_options``: its
    ``quant.fast.FastOptions`` (None: the defaults).

    ``on_batch(i)`` runs after batch i has finished on the device (benchmarks time batches with it);
    ``on_output(i, y)`` receives the model's output for batch i (layer-streamed calibration keeps a block's
    outputs as the next block's inputs). The batches are whatever the model's forward takes: token ids for
    the whole model, hidden states for one block (``piece``: one part of the model, which may rightly have no
    enabled weight quantizer). ``phases`` gets ``forward_s``, the seconds of the passes over the batches (the
    rest of the returned time is modelopt's conversion and bookkeeping). ``converted``: the model's quantizers
    were converted and calibrated before (a block reused for the next layer): ``quant.reuse.recalibrate`` clears
    their statistics and calibrates them again, without converting. ``experts_ratio`` (top-k mode only): partial
    forced routing, each token's statistics also from the first ceil(r x E) experts of its gate's ranking
    (quant/forced_routing.py); the layer output stays top-k's.
    """
    import modelopt.torch.quantization as mtq

    from deepseek_ptq.quant import modules
    from deepseek_ptq.quant.fast import fast_calibration, why_not
    from deepseek_ptq.quant.fast.expert_weights import observe_stacked, stack_experts
    from deepseek_ptq.quant.recipes import algorithm_method

    if experts_ratio is not None and all_experts:
        raise ValueError("experts_ratio is top-k calibration with forced routing; all_experts is ratio 1 already")
    start = time.perf_counter()
    modules.register()
    # A reused block on the fast path: its experts are dequantized once, for the finite check, the weight
    # pass and the grouped GEMMs (quant/fast/expert_weights.py).
    stacked = stack_experts(model, fast_options) if converted and fast and why_not(model, algorithm_method(mtq_cfg)) is None else {}
    check_finite_weights(model, stacked)
    if algorithm_method(mtq_cfg) != "max":
        log.info("algorithm %s reads weights directly: dequantizing FP8 weights in place", algorithm_method(mtq_cfg))
        materialize_dequantized_weights(model)

    def calibration_path(m: nn.Module) -> contextlib.AbstractContextManager:
        if fast:
            reason = why_not(m, algorithm_method(mtq_cfg))
            if reason is None:
                return fast_calibration(m, all_experts, fast_options, stacked, experts_ratio=experts_ratio)
            log.info("plain calibration path: %s", reason)
        return plain_calibration(m, all_experts, experts_ratio)

    def forward_loop(m: nn.Module) -> None:
        # Some algorithms (AWQ) run the loop more than once: the counts describe one pass over the data.
        reset_token_counts(m)
        bad_batch = None
        loop_start = time.perf_counter()
        with guard_quantizers(m), calibration_path(m) as path:
            for i, tokens in enumerate(tqdm(batches, desc="calibrate", unit="batch", disable=not progress)):
                tokens = tokens.to(device)
                try:
                    output = m(tokens, logits=False)
                    finite = bool(torch.isfinite(output).all())
                except NonFiniteActivations:
                    finite = False  # a quantizer refused a non-finite input: name the module below
                if not finite:
                    bad_batch = tokens
                    break
                if on_output is not None:
                    on_output(i, output)
                if on_batch is not None:
                    on_batch(i)
            else:
                try:
                    path.flush()
                except NonFiniteActivations as err:
                    _stop_statistics(m)
                    raise _non_finite_error(err.where or "(unknown)") from None
        if phases is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            phases["forward_s"] = phases.get("forward_s", 0.0) + time.perf_counter() - loop_start
        if bad_batch is not None:
            # Outside the block: the hunt runs the plain top-k path, one call per expert, statistics stopped.
            _stop_statistics(m)
            raise _non_finite_error(first_non_finite_module(m, bad_batch))

    with _one_piece_of_the_model() if piece else contextlib.nullcontext(), quantizer_count_to_log():
        if converted:
            recalibrate(model, mtq_cfg["algorithm"], forward_loop, observe_weights=lambda: observe_stacked(stacked))
        else:
            mtq.quantize(model, mtq_cfg, forward_loop)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
