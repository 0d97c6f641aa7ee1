"""Training the tiny DeepSeek-V3 on byte-level text, with DeepSeek-V3's routing balance, into the release format.

Precision: fp32 master weights and AdamW state, forward and backward under bf16 autocast (every matmul,
attention and the gate in bf16), the residual stream in fp32. The stored model is bf16 / FP8
(see model.checkpoint.release_state).

Routing balance, as DeepSeek-V3 trains it: auxiliary-loss-free selection bias (after each step every expert's
``gate.bias`` moves by ``gamma`` towards the mean load; the bias steers selection only; gamma 10x DeepSeek's
for a run 1000x shorter) plus a small
sequence-wise balance loss. ``balance_band`` > 1 leaves loads within [mean / band, mean * band] alone: the bias
then prevents routing collapse without flattening the popularity differences a real model keeps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs
from deepseek_ptq.model.checkpoint import load_shard, release_state, shard_name
from deepseek_ptq.model.load import PACKAGED
from deepseek_ptq.model.moe import MoE
from deepseek_ptq.model.transformer import Transformer
from deepseek_ptq.pipeline.data import ByteTokenizer, default_corpus, is_heldout, read_tokens

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    out_dir: str
    corpus: str | None = None  # folder of *.py files; None: this Python's standard library (data.default_corpus)
    config: str = str(PACKAGED / "tiny.json")
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # DeepSeek-V3 used 1e-3 over a long run; in a few thousand steps that cannot catch up with the early routing
    # collapse (on the CPU, 100 steps: one expert took nearly every token with 1e-3, loads were in the band with 1e-2).
    bias_gamma: float = 1e-2
    balance_band: float = 2.0  # 1.0: DeepSeek-V3's rule exactly (every expert pushed towards the mean)
    seq_balance_alpha: float = 1e-4  # DeepSeek-V3's sequence-wise balance loss weight
    eval_every: int = 250
    eval_batch_size: int = 64
    eval_windows: int = 0  # > 0: only the first this many held-out windows (quick CPU checks); 0: all
    device: str = "auto"
    max_minutes: float = 0.0  # > 0: stop early (and say so in the log) past this wall time


# ---- data ---------------------------------------------------------------------------------------------

def corpus_streams(corpus: str | None) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """Byte streams of the calibration-split files (training) and of the held-out files, split by name as
    ``deepseek_ptq.pipeline.data`` splits them, so training never sees a file the held-out figures are measured on."""
    files = sorted(Path(corpus).glob("*.py")) if corpus else default_corpus()
    if not files:
        raise UserError(f"no *.py files in {corpus}", fix="point --corpus at a folder of Python sources")
    train_files = [f for f in files if not is_heldout(f)]
    held_files = [f for f in files if is_heldout(f)]
    if not train_files or not held_files:
        raise UserError(f"{corpus} has too few files to split into training and held-out ({len(files)})",
                        fix="use a folder with tens of files, such as a Python standard library")
    encode = ByteTokenizer().encode
    return (read_tokens(train_files, encode, "training"), read_tokens(held_files, encode, "held-out"),
            [f.name for f in train_files], [f.name for f in held_files])


def heldout_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The whole held-out stream as non-overlapping windows (the remainder dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# ---- model --------------------------------------------------------------------------------------------

def training_args(config: str) -> ModelArgs:
    args = ModelArgs.from_json(config)
    args.dtype = "bf16"  # trained in high precision; FP8 only when stored
    return args


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Seeded initialisation: unit norms, N(0, 1) embedding, N(0, 1/fan_in) linears with the residual outputs
    (wo, w2) scaled down by the depth, zero selection bias."""
    gen = torch.Generator().manual_seed(seed)
    depth_scale = (2 * model.args.n_layers) ** -0.5
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape)
        elif name.endswith("gate.bias"):
            value = torch.zeros(param.shape)
        elif name == "embed.weight":
            value = torch.randn(param.shape, generator=gen)
        else:
            value = torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5
            if name.endswith((".wo.weight", ".w2.weight")):
                value *= depth_scale
        param.copy_(value.to(param.dtype))


def trainable_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """The project's own Transformer with fp32 master weights that take gradients (the bias excepted)."""
    with torch.device(device):
        model = Transformer(args)
    init_weights(model, seed)
    model.float()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("gate.bias"))
    return model


# ---- routing balance ----------------------------------------------------------------------------------

class RoutingBalance:
    """DeepSeek-V3's balance mechanisms on every MoE layer: the selection-bias update and the sequence-wise loss."""

    def __init__(self, model: Transformer, gamma: float, band: float, seq_alpha: float) -> None:
        self.moes = [moe for _, moe in model.moe_layers()]
        self.gamma, self.band, self.seq_alpha = gamma, band, seq_alpha
        self._routed: list[tuple[MoE, torch.Tensor, torch.Tensor]] = []
        for moe in self.moes:
            moe.gate.register_forward_hook(self._record(moe))
        self.reset_counts()

    def _record(self, moe: MoE):
        def hook(gate, inputs, output) -> None:
            if self.seq_alpha > 0 and torch.is_grad_enabled():
                self._routed.append((moe, inputs[0], output[1]))
        return hook

    def reset_counts(self) -> None:
        for moe in self.moes:
            moe.token_counts.zero_()
        self._routed.clear()

    def sequence_loss(self, batch_size: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence (DeepSeek-V3, eq. 17-20), averaged over sequences and layers."""
        total = torch.zeros((), device=self.moes[0].token_counts.device)
        for moe, x, indices in self._routed:
            gate = moe.gate
            n_experts, k = gate.weight.size(0), gate.topk
            scores = F.linear(x, gate.weight).float().sigmoid().view(batch_size, -1, n_experts)
            seq_len = scores.size(1)
            p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [batch, experts]
            chosen = torch.zeros(batch_size * seq_len, n_experts, device=x.device)
            chosen.scatter_(1, indices, 1.0)
            f = chosen.view(batch_size, seq_len, n_experts).sum(1) * n_experts / (k * seq_len)
            total = total + (f * p).sum(-1).mean()
        self._routed.clear()
        return self.seq_alpha * total / max(len(self.moes), 1)

    @torch.no_grad()
    def update_bias(self) -> list[list[int]]:
        """Move each expert's selection bias towards the mean load; returns this step's loads and resets them."""
        loads = []
        for moe in self.moes:
            load = moe.token_counts.float()
            mean = load.mean()
            push = torch.sign(mean - load)
            if self.band > 1.0:
                inside = (load <= mean * self.band) & (load >= mean / self.band)
                push = push.masked_fill(inside, 0.0)
            moe.gate.bias.add_(self.gamma * push)
            loads.append(moe.token_counts.tolist())
        self.reset_counts()
        return loads


# ---- evaluation ---------------------------------------------------------------------------------------

@torch.no_grad()
def bits_per_byte(model: Transformer, windows: torch.Tensor, batch_size: int, device: torch.device,
                  autocast: bool = False) -> float:
    """Mean next-byte cross-entropy in bits over every predicted position of the windows."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for tokens in windows.split(batch_size):
        tokens = tokens.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(tokens)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum"))
        count += tokens[:, 1:].numel()
    model.train(was_training)
    return nll / count / math.log(2)


@torch.no_grad()
def expert_loads(model: Transformer, batches: list[torch.Tensor], device: torch.device) -> dict[str, list[int]]:
    """Routed tokens per expert of every MoE layer over the batches (each token counts once per chosen expert)."""
    for _, moe in model.moe_layers():
        moe.token_counts.zero_()
    for tokens in batches:
        model(tokens.to(device), logits=False)
    return {f"layers.{i}": moe.token_counts.tolist() for i, moe in model.moe_layers()}


def load_table(loads: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Per layer: min, max, max/min and coefficient of variation of the routed-token counts."""
    rows = []
    for layer, counts in loads.items():
        c = torch.tensor(counts, dtype=torch.float64)
        rows.append({"layer": layer, "tokens": int(c.sum()), "min": int(c.min()), "max": int(c.max()),
                     "max_over_min": float(c.max() / c.min()) if c.min() > 0 else math.inf,
                     "cv": float(c.std() / c.mean())})
    return rows


# ---- the run ------------------------------------------------------------------------------------------

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def train(cfg: TrainConfig, command: str = "") -> dict[str, Any]:
    """Train, store the FP8 release checkpoint in ``cfg.out_dir``, and return (and write) the training log."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_stream, held_stream, train_files, held_files = corpus_streams(cfg.corpus)
    held = heldout_windows(held_stream, cfg.seq_len)
    held = held[: cfg.eval_windows] if cfg.eval_windows > 0 else held
    args = training_args(cfg.config)
    model = trainable_model(args, device, cfg.seed)
    balance = RoutingBalance(model, cfg.bias_gamma, cfg.balance_band, cfg.seq_balance_alpha)
    opt = _optimizer(model, cfg, device)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    train_stream = train_stream.to(device)
    record: dict[str, Any] = {
        "command": command, "config": asdict(cfg), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "train_files": len(train_files), "train_bytes": int(train_stream.numel()),
        "heldout_files": held_files, "heldout_bytes": int(held.numel()), "steps": [], "evals": [],
    }
    log_path = out / "train_log.json"
    model.train()
    t0 = time.perf_counter()
    step = 0
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        tokens = sample_batch(train_stream, cfg.batch_size, cfg.seq_len, data_gen)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            bal_loss = balance.sequence_loss(cfg.batch_size) if cfg.seq_balance_alpha > 0 else torch.zeros((), device=device)
        opt.zero_grad(set_to_none=True)
        (lm_loss + bal_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loads = balance.update_bias()
        if step % 10 == 0 or step == cfg.steps - 1:
            maxmin = [max(l) / max(min(l), 1) for l in loads]
            loss = lm_loss.item()
            record["steps"].append({"step": step, "loss": loss, "bpb": loss / math.log(2),
                                    "balance_loss": bal_loss.item(), "grad_norm": grad_norm.item(),
                                    "lr": opt.param_groups[0]["lr"], "load_max_over_min": maxmin,
                                    "time_s": time.perf_counter() - t0})
        last = step == cfg.steps - 1
        if (step + 1) % cfg.eval_every == 0 or last:
            bpb = bits_per_byte(model, held, cfg.eval_batch_size, device, autocast=True)
            balance.reset_counts()
            record["evals"].append({"step": step + 1, "heldout_bpb": bpb, "time_s": time.perf_counter() - t0,
                                    "gate_bias": [moe.gate.bias.tolist() for moe in balance.moes]})
            log.info("step %d  train %.3f bpb  held-out %.3f bpb  %.0f s", step + 1,
                     lm_loss.item() / math.log(2), bpb, time.perf_counter() - t0)
            _write_json(log_path, record)
        if cfg.max_minutes > 0 and time.perf_counter() - t0 > cfg.max_minutes * 60 and not last:
            record["stopped_early_at_step"] = step + 1
            log.warning("stopped at step %d: past --max-minutes %.1f", step + 1, cfg.max_minutes)
            break
    record["train_seconds"] = time.perf_counter() - t0
    record["steps_done"] = step + 1
    record["final"] = store_and_measure(model, args, out, held, cfg.eval_batch_size, device)
    _write_json(log_path, record)
    return record


def store_and_measure(model: Transformer, master_args: ModelArgs, out: Path, held: torch.Tensor,
                      batch_size: int, device: torch.device) -> dict[str, float]:
    """Write the FP8 release checkpoint and config, then measure held-out bits per byte of the plain bf16 model
    and of the stored FP8 checkpoint loaded back through the project's own loader."""
    full = {k: v.detach() for k, v in model.state_dict().items()}
    release_args = ModelArgs.from_dict({**master_args.to_dict(), "dtype": "fp8"})
    save_file(release_state(full, release_args), str(out / shard_name(0, 1)))
    (out / "config.json").write_text(json.dumps(release_args.to_dict(), indent=2) + "\n")
    with torch.device(device):
        bf16 = Transformer(master_args)
    with torch.no_grad():
        for name, param in bf16.named_parameters():
            param.copy_(full[name].to(param.dtype))
    result = {"heldout_bpb_bf16": bits_per_byte(bf16, held, batch_size, device)}
    del bf16
    result["heldout_bpb_fp8_storage"] = bits_per_byte(load_release(out, device), held, batch_size, device)
    return result


def load_release(ckpt_dir: Path, device: torch.device) -> Transformer:
    """The stored checkpoint at W = 1 as the runner loads it."""
    args = ModelArgs.from_json(ckpt_dir / "config.json")
    with torch.device(device):
        model = Transformer(args)
    load_shard(model, ckpt_dir, 0, 1)
    return model.eval()
