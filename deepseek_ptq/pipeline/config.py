"""The typed config schema: Hydra validates every group file and command-line override against it,
so an unknown key, a wrong type or an unknown choice fails before any model work."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deepseek_ptq.errors import UserError
from deepseek_ptq.model.args import ModelArgs


class CalibMode(str, Enum):
    topk = "topk"
    all_experts = "all_experts"


class DataSource(str, Enum):
    text = "text"
    synthetic = "synthetic"


class AttnQuant(str, Enum):
    fp8 = "fp8"
    nvfp4 = "nvfp4"


class IndexerQuant(str, Enum):
    fp8 = "fp8"


class OverrideFormat(str, Enum):
    """What a ``quant.overrides`` entry makes of the linears it matches (README, "Per-module overrides")."""

    nvfp4 = "nvfp4"  # NVFP4 weights and activations (16-element blocks, e4m3 block scales, static global scales)
    fp8 = "fp8"  # FP8 e4m3 per-tensor weights and activations (W8A8, static scales)
    fp8_block = "fp8_block"  # not quantized by the run: the checkpoint's stored FP8 128x128 blocks, exported as stored
    none = "none"  # not quantized: exported as every unquantized linear (the export's --unquantized)


class KVCacheFormat(str, Enum):
    fp8 = "fp8"
    nvfp4 = "nvfp4"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class LoggerKind(str, Enum):
    wandb = "wandb"
    none = "none"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def _optional_model_arg_fields() -> list[tuple[str, Any, Any]]:
    """Every ModelArgs field as an optional override (None: keep the model config JSON's value)."""
    out = []
    for f in dataclasses.fields(ModelArgs):
        if f.name == "extra":
            continue
        kind = typing.get_type_hints(ModelArgs)[f.name]
        base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), str)
        if typing.get_origin(kind) is typing.Literal:
            base = str
        out.append((f.name, base | None, dataclasses.field(default=None)))
    return out


@dataclass
class _ModelBase:
    name: str = MISSING
    # A packaged config (tiny, deepseek_v3, deepseek_16b) or a path to a ModelArgs JSON; None: ckpt_dir/config.json.
    config: str | None = None
    # Folder of model{rank}-mp{W}.safetensors; None: the packaged checkpoint, or (generate_weights) a seeded one.
    ckpt_dir: str | None = None
    # No ckpt_dir: generate a seeded checkpoint into cache_dir on first use (small test models: model=tiny_random).
    generate_weights: bool = False
    # A checkpoint shipped in the package (deepseek_ptq/model/<name>/), used when ckpt_dir is None (model=tiny).
    packaged_ckpt: str | None = None
    seed: int = 0
    # Draw random weights on the device from `seed` instead of loading a checkpoint (model=ds_v3_slice).
    random_weights: bool = False
    cache_dir: str = "${oc.env:DEEPSEEK_PTQ_CACHE,${oc.env:HOME,.}/.cache/deepseek_ptq}"


ModelConfig = dataclasses.make_dataclass("ModelConfig", _optional_model_arg_fields(), bases=(_ModelBase,))


@dataclass
class QuantOverride:
    # fnmatch pattern over the model's linears in DeepSeek's names (layers.3.ffn.experts.5.w1, layers.0.attn.wo);
    # it must match one at least; head, router, embedding and the V3.2 indexer are never reached
    pattern: str = MISSING
    format: OverrideFormat = MISSING


@dataclass
class QuantConfig:
    name: str = MISSING
    preset: str = MISSING  # a modelopt *_CFG name
    attn: AttnQuant | None = None  # attention projections stay unquantized unless set
    wo: bool | None = None  # None: quantized for FP4 formats, as the reference does
    # DeepSeek-V3.2's indexer wq_b/wk: unquantized unless set (as NVIDIA's flow); weights_proj is never quantized
    indexer: IndexerQuant | None = None
    kv_cache: KVCacheFormat | None = None  # recorded in hf_quant_config.json for the serving engine
    algorithm: str | None = None  # None: the preset's own (max, awq_lite, ...)
    # Per-module formats, applied after every other rule of the group, in order: the last matching entry wins
    overrides: list[QuantOverride] = field(default_factory=list)


@dataclass
class CalibConfig:
    name: CalibMode = CalibMode.topk
    sync: bool = True  # peer-max expert input amax after top-k calibration
    strict: bool = False  # an enabled quantizer left without amax fails the run
    fast: bool = True  # grouped-GEMM calibration; false: the plain reference path, one modelopt call per expert
    # Partial forced routing (calib=topk only), 0 < r <= 1: each token's statistics also from the first
    # ceil(r x E) experts of its gate's ranking, the layer output still top-k (quant/forced_routing.py);
    # None: the mode's own routing. r = 1 is all_experts.
    experts_ratio: float | None = None
    # One layer on the device at a time, streamed from the checkpoint (pipeline/stream.py): the same amax as the
    # resident run in the memory of one layer.
    layerwise: bool = False
    resume: bool = False  # layerwise: continue a stopped run in the same hydra.run.dir from its last saved layer
    resume_every: int = 1  # layerwise: save the resume state every N layers (0: never)
    # layerwise on a GPU: keep the calibration hidden states in pinned host memory, moved batch by batch (the
    # device then holds one layer and one batch; 1024 x 512 tokens of the 671B model are 7.5 GB)
    hidden_on_host: bool = False


@dataclass
class ParallelConfig:
    name: str = "single"
    world_size: int = 1  # model-parallel ranks in all
    nnodes: int = 1
    device: Device = Device.auto
    timeout_s: float = 600.0  # bound on every collective and on start-up
    master_port: int = 0  # 0: a free port (spawned ranks)


@dataclass
class DataConfig:
    name: DataSource = DataSource.text
    paths: list[str] = field(default_factory=list)  # files or globs; empty: the Python standard library sources
    # tokenizer.json or tiktoken.model; None: ckpt_dir's tokenizer.json or tiktoken.model, else bytes for vocab 256
    tokenizer: str | None = None
    num_samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 1234


@dataclass
class EvalConfig:
    # Fake-quantized vs unquantized model on held-out data. None: on for the tiny models, off for the
    # others (a 671B evaluation is a choice, not a default).
    enabled: bool | None = None
    num_samples: int = 8  # held-out samples, never used for calibration


def eval_enabled(cfg: Any) -> bool:
    if cfg.eval.enabled is not None:
        return bool(cfg.eval.enabled)
    return cfg.model.name in ("tiny", "tiny_random", "tiny_v32")


@dataclass
class LoggerConfig:
    name: LoggerKind = LoggerKind.wandb
    project: str = "deepseek-ptq"
    mode: WandbMode = WandbMode.offline
    # Bound on starting W&B (wandb.Settings.init_timeout; W&B's default is 90 s): an online start that takes
    # longer falls back to an offline run in the run directory.
    init_timeout_s: float = 10.0
    entity: str | None = None
    group: str | None = None  # None: the sweep folder for multirun, else no group
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = MISSING  # type: ignore[valid-type]
    quant: QuantConfig = MISSING
    calib: CalibConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    log_level: str = "INFO"


def register_schema() -> None:
    ConfigStore.instance().store(name="config_schema", node=Config)


def check_known_keys(cfg: DictConfig, schema: type = Config, prefix: str = "") -> None:
    """Refuse keys the schema lacks. The struct flag stops ``data.num_sample=4``, but a ``+`` override
    (``+data.num_sample=4``, Hydra's own hint for that typo) is applied with the flag lifted
    (OmegaConf.update(force_add=True)), so it would run and be ignored; ``+model.<key>`` would reach ModelArgs."""
    names = [f.name for f in dataclasses.fields(schema)]
    for key in cfg.keys():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            raise UserError(f"unknown config key {prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""),
                            fix=f"drop it; the keys of {prefix.rstrip('.') or 'the config'} are: {', '.join(names)}")
    hints = typing.get_type_hints(schema)
    for name in names:
        if dataclasses.is_dataclass(hints[name]) and name in cfg and not OmegaConf.is_missing(cfg, name):
            check_known_keys(cfg[name], hints[name], f"{prefix}{name}.")
