"""Throughput accounting: tokens and model FLOPs per training sample, and the device's bf16 peak.

The FLOP count is the usual transformer estimate (PaLM appendix B): 6 FLOPs per parameter per
token for forward + backward of the matrix multiplies, plus 12 * T_q * T_k * C per layer for the
attention scores and values. A sample holds both streams (G: N image tokens; D: N + registers),
each token passing through its own stream's expert; MMSA adds the cross-stream key pairs the
switches allow, in the MMSA layers (model.mmsa_layers) only. Phases that run one stream count less
in reality (and a pass skips the queries and MLP of the stream whose output it does not use in the
last layer that needs its keys), so the MFU reported from this count is an upper estimate,
tightest for joint runs.

With a latent generator (model.vae set) the generator stream's N_g tokens are latent patches and the
detector's N_d are pixel patches; the VAE's own FLOPs (encoding the training images when they are not
packed as latents, decoding the fake pool's samples and L_auth's x0_hat) are counted apart
(`vae_flops`), so `mfu` stays the model's and the VAE's share is reported beside it.
engine/train/estimate.py builds the full per-phase count and the memory estimate on these pieces.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ModelConfig, gen_grid, mmsa_layer_set
from ..phase_modes import schedule

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, from the vendors' data sheets.
BF16_PEAK = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.0e12,
             "H100": 989.4e12, "A100": 312.0e12}


@dataclass(frozen=True)
class VaeGeometry:
    """What the estimates need of a diffusers AutoencoderKL, read from its config.json (no weights)."""
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    source: str = ""  # where the numbers came from (shown by `unigendet info --config`)

    @property
    def downsample(self) -> int:
        """Pixels per latent cell, per side: one 2x downsampling per encoder block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)


# The FLUX VAE's block layout, assumed for the VAE's FLOPs and size when model.vae names a folder
# without a config.json yet (sizing a run before the download): the published model's VAE. SD / SDXL
# VAEs have the same blocks with 4 latent channels and quant convs; the latent channels and the
# downsampling factor always come from the model config (model.latent_channels / latent_downsample).
FLUX_BLOCKS = (128, 256, 512, 512)


def vae_geometry(m: ModelConfig) -> VaeGeometry | None:
    """The VAE of a latent model (model.vae): PATH/config.json when it exists, else FLUX's block layout
    with the config's latent channels and downsampling (its `source` says so); None in pixel space."""
    if not m.vae:
        return None
    config = Path(m.vae) / "config.json"
    if not config.is_file():
        blocks = int(math.log2(m.latent_downsample)) + 1
        chans = FLUX_BLOCKS[:blocks] + (FLUX_BLOCKS[-1],) * max(0, blocks - len(FLUX_BLOCKS))
        return VaeGeometry(latent_channels=m.latent_channels, block_out_channels=chans, layers_per_block=2,
                           use_quant_conv=False, use_post_quant_conv=False,
                           source=f"{m.vae} (no config.json there: FLUX-VAE blocks assumed)")
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
        return VaeGeometry(latent_channels=int(raw.get("latent_channels", 4)),
                           block_out_channels=tuple(int(c) for c in raw.get("block_out_channels", (64,))),
                           layers_per_block=int(raw.get("layers_per_block", 1)),
                           in_channels=int(raw.get("in_channels", 3)), out_channels=int(raw.get("out_channels", 3)),
                           use_quant_conv=bool(raw.get("use_quant_conv", True)),
                           use_post_quant_conv=bool(raw.get("use_post_quant_conv", True)),
                           mid_block_add_attention=bool(raw.get("mid_block_add_attention", True)),
                           source=str(config))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{config}: model.vae's config.json is not a readable AutoencoderKL config ({e})") from None


def stream_tokens(cfg: ModelConfig) -> tuple[int, int]:
    """(N_g, N_d + R): tokens of the generator and detector streams of one sample. The generator
    patchifies latents (side S / f, patch model.latent_patch_size) with model.vae, else pixels."""
    return gen_grid(cfg) ** 2, (cfg.image_size // cfg.patch_size) ** 2 + cfg.registers


def tokens_per_sample(cfg: ModelConfig) -> int:
    """Tokens of one training sample over both streams."""
    return sum(stream_tokens(cfg))


def ffn_width(cfg: ModelConfig) -> int:
    """SwiGLU hidden size F (mlp_ratio * C rounded up to a multiple of 8, as the model builds it)."""
    return int(cfg.mlp_ratio * cfg.width + 7) // 8 * 8


def expert_matrix_params(cfg: ModelConfig) -> int:
    """Weights of one expert's matrices in one layer: qkv, out, gate_up, down."""
    C, F, D = cfg.width, ffn_width(cfg), cfg.width // cfg.heads
    return C * (cfg.heads + 2 * cfg.kv_heads) * D + cfg.heads * D * C + 2 * C * F + F * C


def train_flops_per_sample(cfg: ModelConfig) -> float:
    """Forward + backward model FLOPs of one sample (estimate of the module docstring): the model
    FLOPs `mfu` divides by; engine/train/estimate.py counts what a step really runs besides."""
    t_g, t_d = stream_tokens(cfg)
    head_dim = cfg.width // cfg.heads
    dense = 6.0 * expert_matrix_params(cfg) * cfg.depth * (t_g + t_d)
    self_pairs = (t_g * t_g + t_d * t_d) * cfg.depth
    cross_pairs = ((t_g * t_d if cfg.g2d else 0) + (t_d * t_g if cfg.d2g else 0)) * len(mmsa_layer_set(cfg))
    attention = 12.0 * (self_pairs + cross_pairs) * cfg.heads * head_dim
    return dense + attention


# ----------------------------------------------------------------------------- the VAE's FLOPs


def _conv(c_in: int, c_out: int, side: int, k: int = 3) -> float:
    """Forward FLOPs of a k x k convolution producing a side x side map (2 per multiply-add)."""
    return 2.0 * k * k * c_in * c_out * side * side


def _resnet(c_in: int, c_out: int, side: int) -> float:
    """diffusers ResnetBlock2D: two 3x3 convs, a 1x1 shortcut when the channels change."""
    return _conv(c_in, c_out, side) + _conv(c_out, c_out, side) + (_conv(c_in, c_out, side, 1) if c_in != c_out else 0)


def _mid_block(c: int, side: int, attention: bool) -> float:
    """UNetMidBlock2D: resnet, single-head self-attention over side^2 tokens (if on), resnet."""
    tokens = side * side
    attn = 2.0 * 4 * c * c * tokens + 4.0 * tokens * tokens * c if attention else 0.0  # q, k, v, out; QK^T, PV
    return 2 * _resnet(c, c, side) + attn


def vae_encode_flops(vae: VaeGeometry, image_size: int) -> float:
    """Forward FLOPs of encoding one image (S x S) to its posterior moments: the convolutions, the mid
    block's attention; norms and activations are left out (a few percent)."""
    chans, side = vae.block_out_channels, image_size
    total = _conv(vae.in_channels, chans[0], side)
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(vae.layers_per_block):
            total += _resnet(c_prev if j == 0 else c, c, side)
        c_prev = c
        if i < len(chans) - 1:
            side //= 2
            total += _conv(c, c, side)  # stride-2 3x3 downsampling conv, at the output side
    total += _mid_block(chans[-1], side, vae.mid_block_add_attention)
    total += _conv(chans[-1], 2 * vae.latent_channels, side)
    if vae.use_quant_conv:
        total += _conv(2 * vae.latent_channels, 2 * vae.latent_channels, side, 1)
    return total


def vae_decode_flops(vae: VaeGeometry, image_size: int) -> float:
    """Forward FLOPs of decoding one latent to an S x S image (as `vae_encode_flops`)."""
    chans, side = tuple(reversed(vae.block_out_channels)), image_size // vae.downsample
    total = _conv(vae.latent_channels, vae.latent_channels, side, 1) if vae.use_post_quant_conv else 0.0
    total += _conv(vae.latent_channels, chans[0], side) + _mid_block(chans[0], side, vae.mid_block_add_attention)
    c_prev = chans[0]
    for i, c in enumerate(chans):
        for j in range(vae.layers_per_block + 1):
            total += _resnet(c_prev if j == 0 else c, c, side)
        c_prev = c
        if i < len(chans) - 1:
            side *= 2
            total += _conv(c, c, side)  # nearest 2x upsampling, then a 3x3 conv
    return total + _conv(chans[-1], vae.out_channels, side)


def vae_step_flops(cfg: Config, vae: VaeGeometry | None) -> dict[str, float]:
    """The VAE's FLOPs per training sample, averaged over the phase schedule:
    `vae_decode` = the fake-pool refill's samples (phases.refill_count every phases.refill_every steps)
    and L_auth's decode(x0_hat) in generating phases (forward + the input-gradient backward through
    the decoder, 2x the forward);
    `vae_encode` = encoding the sample's image in the steps that read its latents (generating phases;
    with model.d2g also those that detect it), which a step does only without packed latents;
    `vae_encode_detect` = what d2g's detection passes encode whatever the data: the refill's samples,
    L_auth's encode(decode(x0_hat)) (forward + input-gradient backward) and, with [augment] on, the
    det pass's augmented images (the sample and its fake-pool partner)."""
    if vae is None:
        return {"vae_decode": 0.0, "vae_encode": 0.0, "vae_encode_detect": 0.0}
    from .detector_augment import augment_enabled

    S, ph, phases = cfg.model.image_size, cfg.phases, schedule(cfg.phases.mode)
    auth = cfg.loss.lambda_dig * cfg.loss.w_auth > 0
    align = cfg.loss.lambda_dig * cfg.loss.w_align > 0
    d2g = cfg.model.d2g

    def share(test) -> float:
        return sum(1 for p in phases if test(p)) / len(phases)

    generating, detecting = share(lambda p: p.generates), share(lambda p: p.detects)
    reads_latents = share(lambda p: p.generates or (d2g and (p.detects or align)))
    refill = ph.refill_count / (ph.refill_every * cfg.train.batch_size) if any(p.uses_fake_pool for p in phases) else 0
    encode = vae_encode_flops(vae, S)
    detect = refill + 2.0 * generating * auth + 2.0 * detecting * augment_enabled(cfg.augment) if d2g else 0.0
    return {"vae_decode": vae_decode_flops(vae, S) * (2.0 * generating * auth + refill),
            "vae_encode": encode * reads_latents, "vae_encode_detect": encode * detect}


def vae_params(vae: VaeGeometry) -> int:
    """Parameters of the whole AutoencoderKL (encoder + decoder; convs, norms and attention)."""
    def conv(ci, co, k=3):
        return k * k * ci * co + co

    def resnet(ci, co):
        return 2 * ci + conv(ci, co) + 2 * co + conv(co, co) + (conv(ci, co, 1) if ci != co else 0)

    def mid(c):
        return 2 * resnet(c, c) + ((4 * (c * c + c) + 2 * c) if vae.mid_block_add_attention else 0)

    L, chans = vae.latent_channels, vae.block_out_channels
    enc = conv(vae.in_channels, chans[0]) + mid(chans[-1]) + 2 * chans[-1] + conv(chans[-1], 2 * L)
    c_prev = chans[0]
    for i, c in enumerate(chans):
        enc += sum(resnet(c_prev if j == 0 else c, c) for j in range(vae.layers_per_block))
        enc += conv(c, c) if i < len(chans) - 1 else 0
        c_prev = c
    rev = tuple(reversed(chans))
    dec = conv(L, rev[0]) + mid(rev[0]) + 2 * rev[-1] + conv(rev[-1], vae.out_channels)
    c_prev = rev[0]
    for i, c in enumerate(rev):
        dec += sum(resnet(c_prev if j == 0 else c, c) for j in range(vae.layers_per_block + 1))
        dec += conv(c, c) if i < len(rev) - 1 else 0
        c_prev = c
    quant = (conv(2 * L, 2 * L, 1) if vae.use_quant_conv else 0) + (conv(L, L, 1) if vae.use_post_quant_conv else 0)
    return enc + dec + quant


def device_peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a CUDA device found in BF16_PEAK, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)
