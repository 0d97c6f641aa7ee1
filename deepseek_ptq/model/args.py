"""Model hyper-parameters, named exactly as DeepSeek's ``ModelArgs`` so their config JSON files load unchanged."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.kernels import BLOCK

_INDEXER_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")


@dataclass
class ModelArgs:
    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: Literal["bf16", "fp8"] = "bf16"
    scale_fmt: str | None = None
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    route_scale: float = 1.0
    # The reference code creates the selection bias only for dim == 7168; here it is explicit.
    gate_bias: bool | None = None
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # DeepSeek-V3.2 lightning indexer (model/indexer.py); index_n_heads 0: none (V3, R1, V3.1)
    index_n_heads: int = 0
    index_head_dim: int = 128
    index_topk: int = 2048
    # fields of newer releases that this runner accepts but does not model
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gate_bias is None:
            self.gate_bias = self.dim == 7168
        if self.has_indexer:
            self._check_indexer()

    @property
    def has_indexer(self) -> bool:
        return self.index_n_heads > 0

    def _check_indexer(self) -> None:
        d = self.index_head_dim
        problems = []
        if self.q_lora_rank == 0:
            problems.append("q_lora_rank=0 (the indexer reads the query latent)")
        if d % BLOCK or d & (d - 1):
            problems.append(f"index_head_dim={d} is not a power of two and a multiple of {BLOCK} (Hadamard, FP8 blocks)")
        if self.qk_rope_head_dim > d:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} > index_head_dim={d}")
        if self.index_topk < 1:
            problems.append(f"index_topk={self.index_topk}")
        if problems:
            raise UserError(f"the indexer (index_n_heads={self.index_n_heads}) cannot be built: {'; '.join(problems)}",
                            fix="use a DeepSeek-V3.2 config (index_head_dim 128, q_lora_rank > 0), or index_n_heads=0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as err:
            raise UserError(f"{source}: {err}", fix="use DeepSeek's ModelArgs field names") from err

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise UserError(f"model config {path} does not exist",
                            fix="point model.config at a DeepSeek config JSON or model.ckpt_dir at a folder holding config.json") from err
        except json.JSONDecodeError as err:
            raise UserError(f"model config {path} is not valid JSON: {err}", fix="repair the file") from err
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.update(values.pop("extra"))
        if not self.has_indexer:  # a V3 config stays what DeepSeek's V3 code reads (and its cache digests stay)
            for name in _INDEXER_FIELDS:
                values.pop(name)
        return values

    def differences(self, other: ModelArgs) -> list[str]:
        """The modelled fields on which two configs differ, as ``name=mine/theirs``."""
        return [f"{f.name}={getattr(self, f.name)}/{getattr(other, f.name)}" for f in dataclasses.fields(self)
                if f.name != "extra" and getattr(self, f.name) != getattr(other, f.name)]

    def check_world_size(self, world_size: int, whole_fp8_blocks: bool = False) -> None:
        """Refuse a world size the weights cannot be split by, before any model is built or any rank spawned.

        ``whole_fp8_blocks``: the shards are cut from one full FP8 checkpoint (the packaged or a generated one),
        where each rank's part of a split dimension must be whole 128-wide blocks, as its block scale splits
        with it (DeepSeek's converter asks the same). A model drawn in place keeps partial blocks."""
        problems = self._split_problems(world_size, whole_fp8_blocks)
        if problems:
            fitting = [w for w in (2, 4, 8, 16, 32, 64) if w < world_size and not self._split_problems(w, whole_fp8_blocks)]
            raise UserError(f"the model cannot be split across {world_size} ranks: {'; '.join(problems)}",
                            fix=f"use parallel=mp{fitting[-1]} or fewer ranks" if fitting else "use parallel=single")

    def _split_problems(self, world_size: int, whole_fp8_blocks: bool) -> list[str]:
        indivisible = [f"{name}={size}" for name, size in (
            ("n_routed_experts", self.n_routed_experts), ("n_heads", self.n_heads), ("vocab_size", self.vocab_size),
            ("inter_dim", self.inter_dim), ("n_shared_experts*moe_inter_dim", self.n_shared_experts * self.moe_inter_dim),
        ) if size % world_size]
        if indivisible:
            return [f"{', '.join(indivisible)} not divisible by {world_size}"]
        if whole_fp8_blocks and self.dtype == "fp8" and world_size > 1:
            short = [f"{name}={size} ({size // world_size} a rank)" for name, size in self._fp8_split_dims()
                     if (size // world_size) % BLOCK]
            if short:
                return [f"{', '.join(short)} not a multiple of the {BLOCK}-wide FP8 block"]
        return []

    def _fp8_split_dims(self) -> list[tuple[str, int]]:
        """The full sizes of the dims that FP8 linears split across ranks (the head and the embedding are bf16,
        routed experts stay whole)."""
        dims = [("n_heads*qk_head_dim", self.n_heads * self.qk_head_dim),
                ("n_heads*(qk_nope_head_dim+v_head_dim)", self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)),
                ("n_heads*v_head_dim", self.n_heads * self.v_head_dim)]
        if self.n_dense_layers > 0:
            dims.append(("inter_dim", self.inter_dim))
        if self.n_moe_layers > 0 and self.n_shared_experts > 0:
            dims.append(("n_shared_experts*moe_inter_dim", self.n_shared_experts * self.moe_inter_dim))
        return dims


def refuse_compressed_weights(config: dict[str, Any], source: str) -> None:
    """Refuse a Hugging Face config.json whose weights are compressed-tensors (Kimi-K2-Thinking and later Kimi
    releases: INT4 routed experts, ``pack-quantized``, 4-bit int in groups of 32; K2.5 nests it in ``text_config``).
    The runner reads FP8 block-scaled or BF16 weights only: such a checkpoint would otherwise fail later on tensor
    names it does not know, or build a model from the wrong fields."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    quant = config.get("quantization_config") or text.get("quantization_config") or {}
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return
    groups = quant.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    kinds = sorted({f"{w.get('num_bits')}-bit {w.get('type')} in groups of {w.get('group_size')}" for w in weights})
    int4 = any(w.get("num_bits") == 4 and w.get("type") == "int" for w in weights)
    raise UserError(f"{source} describes compressed-tensors weights ({quant.get('format')}: {', '.join(kinds) or 'no groups'})"
                    f"{', INT4 routed experts as Kimi-K2-Thinking and later ship them' if int4 else ''}: "
                    "this runner does not read compressed-tensors weights yet",
                    fix="use an FP8 or BF16 release of the model (Kimi-K2-Instruct or -Base), or dequantize the "
                        "compressed experts to BF16 first, then convert it with deepseek-ptq-convert")
