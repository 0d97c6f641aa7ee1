"""Layer-streamed calibration (``calib.layerwise=true``): one block of this rank's shard on the device at a time.

The embedding runs once over every batch; then, layer by layer: read the layer's tensors (on a background
thread, while the previous layer computes), build and quantize it, run every calibration batch through it
(its outputs, computed with the quantizers observing and not quantizing, exactly as in the resident run,
become the next layer's inputs), run the fixup on it (every rank, every layer: the same collectives as the
resident run's, one per layer), run the held-out batches through it twice (quantizers off and on), keep its
amax and free it (or hand its converted modules to the next layer of its kind, quant/reuse.py: modelopt's
conversion is seconds of Python per 671B layer). Max calibration of a layer needs only its weights and its
inputs, so the amax are those of the resident run (tests/test_layerwise.py checks them bit for bit).
"""

from __future__ import annotations

import gc
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from deepseek_ptq.common import choice
from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import ShardFile, expected_params
from deepseek_ptq.model.load import RandomWeights
from deepseek_ptq.model.parallel import Parallel
from deepseek_ptq.model.pieces import Ends, LayerPiece
from deepseek_ptq.model.span_reader import SpanReader, layout_bytes
from deepseek_ptq.model.synthetic import init_random_
from deepseek_ptq.observe.evaluate import ScoreAccumulator, quantizers_disabled
from deepseek_ptq.pipeline import resume
from deepseek_ptq.pipeline.calibrated import Calibrated, fixup_record, merge_records
from deepseek_ptq.pipeline.data import Batches
from deepseek_ptq.pipeline.rundir import amax_state
from deepseek_ptq.quant.calibrate import calibrate, insert_quantizers
from deepseek_ptq.quant.fixup import leaf_quantizers
from deepseek_ptq.quant.modules import quantized_linears
from deepseek_ptq.quant.recipes import algorithm_method
from deepseek_ptq.quant.reuse import why_not_reuse

log = logging.getLogger(__name__)


_PORTABLE = 1  # cudaHostRegisterPortable


class HostBuffer:
    """Bytes on the host; ``pinned``: page-locked with cudaHostRegister, at exactly this size (torch's pinned
    allocator rounds up to a power of two: 16 GB for an 11.3 GB 671B MoE layer)."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned = pinned and nbytes > 0
        if self.pinned:
            # portable: pinned for every device's context, whichever one the reading thread has current
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, _PORTABLE))

    def free(self) -> None:
        if self.pinned:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr()))
            self.pinned = False
        self.tensor = torch.empty(0, dtype=torch.uint8)


class LayerSource:
    """Where a piece's weights come from: this rank's shard (read ahead on a thread), or a seeded draw."""

    def __init__(self, ckpt: Path | RandomWeights, args: ModelArgs, par: Parallel, device: torch.device) -> None:
        self.args, self.par, self.device = args, par, device
        self.random = ckpt if isinstance(ckpt, RandomWeights) else None
        self.shard: ShardFile | None = None
        self._layer_keys: list[list[str]] = []  # each layer's checkpoint keys, what a read of it asks for
        if self.random is None:
            # Every layer's names, shapes and dtypes are checked against the file's header before any compute:
            # a shard lacking one tensor fails now, naming it, not hours later at its layer.
            expected = expected_params(self._meta_ends())
            for i in range(args.n_layers):
                layer = expected_params(self._meta_layer(i))
                self._layer_keys.append(list(layer))
                expected |= layer
            self.shard = ShardFile(ckpt, par.rank, par.world_size, expected)
            self.reader = SpanReader(self.shard.path)
        # Two read buffers, reused layer after layer: layer i+1 is read into one while layer i's weights are
        # copied out of the other (pinned on a GPU, so those copies run without staging). A buffer is written
        # again only after the device has finished copying out of it (its event), and grows to the largest layer.
        self._buffers: list[HostBuffer | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._pending: dict[int, Future] = {}

    def _meta_layer(self, i: int) -> LayerPiece:
        with torch.device("meta"):
            return LayerPiece(self.args, i, self.par)

    def _meta_ends(self) -> Ends:
        with torch.device("meta"):
            return Ends(self.args, self.par)

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        slot, keys = i % 2, self._layer_keys[i]
        if self._copied[slot] is not None:
            self._copied[slot].synchronize()
        needed = layout_bytes([self.reader.spans[k] for k in keys])
        if self._buffers[slot] is None or self._buffers[slot].tensor.numel() < needed:
            if self._buffers[slot] is not None:
                self._buffers[slot].free()
            self._buffers[slot] = HostBuffer(needed, pinned=self.device.type == "cuda")
        tensors = self.reader.read_into(keys, self._buffers[slot].tensor)
        return tensors, time.perf_counter() - start

    def prefetch(self, i: int) -> None:
        """Start reading layer ``i`` (nothing to read for drawn weights)."""
        if self.shard is not None and i < self.args.n_layers and i not in self._pending:
            self._pending[i] = self._pool.submit(self._read, i)

    def ends(self) -> Ends:
        with torch.device(self.device):
            ends = Ends(self.args, self.par)
        self._fill(ends, self.shard.read(list(expected_params(ends))) if self.shard is not None else None)
        return ends.eval()

    def layer(self, i: int, reuse: LayerPiece | None = None) -> tuple[LayerPiece, dict[str, float]]:
        """Layer ``i`` on the device with its weights, and the seconds spent reading it and waiting for the read.
        ``reuse``: a block of the same kind whose modules take layer ``i``'s names and weights (quant/reuse.py)."""
        self.prefetch(i)
        start = time.perf_counter()
        tensors, read_s = self._pending.pop(i).result() if self.shard is not None else (None, 0.0)
        wait_s = time.perf_counter() - start
        if reuse is not None:
            piece = reuse
            piece.renumber(i)
        else:
            with torch.device(self.device):
                piece = LayerPiece(self.args, i, self.par)
        self._fill(piece, tensors)
        if tensors is not None and self.device.type == "cuda":
            self._copied[i % 2] = torch.cuda.Event()
            self._copied[i % 2].record()
        return piece.eval(), {"read_s": read_s, "read_wait_s": wait_s}

    def _fill(self, piece: torch.nn.Module, tensors: dict[str, torch.Tensor] | None) -> None:
        if self.random is not None:
            init_random_(piece, self.random.seed)
        else:
            assert self.shard is not None and tensors is not None
            self.shard.copy_into(piece, tensors)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.shard is not None:
            _synchronize(self.device)  # no copy out of a buffer is still in flight
            for buffer in self._buffers:
                if buffer is not None:
                    buffer.free()
            self.reader.close()
            self.shard.close()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _on_host(h: torch.Tensor) -> torch.Tensor:
    """A pinned host copy: the device copies it in (and the next layer's output back) without staging."""
    return torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=torch.cuda.is_available()).copy_(h)


@torch.no_grad()
def calibrate_streamed(cfg: Any, args: ModelArgs, ckpt: Path | RandomWeights, par: Parallel, device: torch.device,
                       batches: Batches, mtq_cfg: dict[str, Any], evaluate: bool, run_dir: Path) -> Calibrated:
    """This rank's shard calibrated layer by layer (see the module docstring); every rank runs every layer."""
    if algorithm_method(mtq_cfg) != "max":
        raise UserError(f"calib.layerwise=true calibrates with max statistics; algorithm "
                        f"{algorithm_method(mtq_cfg)!r} is not supported layer by layer yet",
                        fix="set calib.layerwise=false (the resident run) for this recipe")
    rank0 = par.rank == 0
    all_experts = choice(cfg.calib.name) == "all_experts"
    digest = resume.fingerprint(cfg)
    timings = {"load": 0.0, "calibrate": 0.0, "eval": 0.0}
    start = time.perf_counter()
    source = LayerSource(ckpt, args, par, device)
    try:
        ends = source.ends()
        # The ends hold the head, whose quantizers the rules keep off: converted all the same, so that the
        # summary, the amax state and the excluded modules list what the resident run lists.
        insert_quantizers(ends, mtq_cfg)
        record_ends = fixup_record(ends, par, cfg.calib.sync, device)
        to_host = cfg.calib.hidden_on_host and device.type == "cuda"
        state = (resume.load(run_dir, par.rank, par.world_size, digest, device, hidden_on_host=to_host)
                 if cfg.calib.resume else None)
        if state is None:
            if cfg.calib.resume:
                log.warning("calib.resume=true but %s holds no resume state: starting from layer 0",
                            run_dir / resume.RESUME_DIR)
            heldout = [ends(b.to(device)) for b in batches.heldout] if evaluate else []
            # Each batch's embedding goes to the host as it is made: the whole set is never on the device.
            hidden = [_on_host(h) if to_host else h for h in (ends(b.to(device)) for b in batches.calib)]
            state = resume.StreamState(0, amax_state(ends), [record_ends], {}, hidden, list(heldout), heldout)
            del hidden, heldout  # the state holds them now, and replaces them layer by layer
        else:
            log.info("resuming at layer %d of %d from %s", state.next_layer, args.n_layers, run_dir / resume.RESUME_DIR)
            if to_host:
                state.hidden = [_on_host(h) for h in state.hidden]
        _synchronize(device)
        if device.type == "cuda":
            ends.cpu()  # the embedding and head (3.7 GB at 671B) wait on the host while the layers stream
        resumed_from = state.next_layer
        timings["load"] += time.perf_counter() - start
        _stream_layers(cfg, source, state, par, device, mtq_cfg, all_experts, evaluate, run_dir, digest, rank0)
        for entry in state.layers:
            for key in ("load", "calibrate", "eval"):
                timings[key] += entry[f"{key}_s"]
        scores = None
        if evaluate:
            t0 = time.perf_counter()
            ends.to(device)
            acc = ScoreAccumulator()
            for tokens, ref, quant in zip(batches.heldout, state.heldout_ref, state.heldout_quant):
                acc.add(tokens.to(device), ends.logits(ref), ends.logits(quant))
            scores = acc.scores()
            timings["eval"] += time.perf_counter() - t0
    finally:
        source.close()
    return Calibrated(state.amax, merge_records(state.records), state.tokens, scores, timings, state.layers,
                      resumed_from)


def _stream_layers(cfg: Any, source: LayerSource, state: resume.StreamState, par: Parallel, device: torch.device,
                   mtq_cfg: dict[str, Any], all_experts: bool, evaluate: bool, run_dir: Path, digest: str,
                   rank0: bool) -> None:
    n_layers = source.args.n_layers
    every = cfg.calib.resume_every
    hidden = state.hidden

    def keep(i: int, output: torch.Tensor) -> None:
        # The input of batch i is no longer needed: one set of hidden states at a time. On the host, the output
        # goes back into the input's pinned buffer, after the compute that read it (one CUDA stream orders both).
        if hidden[i].device == output.device:
            hidden[i] = output
        else:
            hidden[i].copy_(output, non_blocking=True)

    weights_quantized = state.next_layer > 0  # a resumed run checked its first layers
    kept: LayerPiece | None = None  # the converted block that the next layer takes over (quant/reuse.py)
    said_why = False
    bar = tqdm(range(state.next_layer, n_layers), desc="layers", unit="layer", disable=not rank0,
               initial=state.next_layer, total=n_layers)
    for i in bar:
        t0 = layer_start = time.perf_counter()
        if kept is not None and (why := why_not_reuse(kept, mtq_cfg, i)) is not None:
            if kept.can_become(i) and not said_why:
                said_why = True
                log.info("layer %d is converted afresh (and others may be): %s", i, why)
            kept = None
            gc.collect()  # modelopt's modules hold reference cycles: free the block before the next one is built
        reused = kept is not None
        piece, read = source.layer(i, reuse=kept)
        source.prefetch(i + 1)  # read while this layer computes
        _synchronize(device)
        load_s = time.perf_counter() - t0
        phases: dict[str, float] = {}
        calibrate_s = calibrate(piece, mtq_cfg, hidden, all_experts, device, progress=False, fast=cfg.calib.fast,
                                on_output=keep, piece=True, phases=phases, converted=reused,
                                experts_ratio=cfg.calib.experts_ratio)
        weights_quantized = weights_quantized or any(q.is_enabled for _, m in quantized_linears(piece)
                                                     for q in leaf_quantizers(m.weight_quantizer))
        state.tokens.update({j: moe.token_counts.tolist() for j, moe in piece.moe_layers()})
        record = fixup_record(piece, par, cfg.calib.sync, device)
        state.records.append(record)
        state.amax.update(amax_state(piece))
        t0 = time.perf_counter()
        if evaluate:
            with quantizers_disabled(piece):
                state.heldout_ref = [piece(h) for h in state.heldout_ref]
            state.heldout_quant = [piece(h) for h in state.heldout_quant]
            _synchronize(device)
        eval_s = time.perf_counter() - t0
        kept = piece
        del piece
        state.layers.append({"layer": i, "load_s": load_s, "calibrate_s": calibrate_s, "fixup_s": record["fixup_s"],
                             "eval_s": eval_s, "forward_s": phases.get("forward_s", 0.0), **read,
                             "converted": float(not reused)})
        state.next_layer = i + 1
        if every > 0 and (state.next_layer % every == 0 or state.next_layer == n_layers):
            _synchronize(device)  # the hidden states copied back to the host are complete
            resume.save(run_dir, par.rank, par.world_size, digest, state)
        state.layers[-1]["wall_s"] = time.perf_counter() - layer_start  # all of it: records and resume state too
    kept = None
    gc.collect()  # the last block goes before the head comes back for the evaluation
    if not weights_quantized:  # modelopt's own check, which the pieces skip, for the whole model
        raise UserError(f"quant={cfg.quant.name} enabled no weight quantizer in any layer: nothing was quantized",
                        fix="check the quant group's patterns against the model's module names")
