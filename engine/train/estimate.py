"""Sizing a run before it starts: parameters, tokens, FLOPs per sample and memory per GPU of a config.

    est = estimate(load_config("base_256"))          # world_size from the config's kind of run
    print("\\n".join(est.lines()))                   # what `unigendet info --config NAME` prints

What is counted (all numbers per training sample or per GPU, from the config alone: the model is built
on the meta device for its parameter count, the VAE's geometry is read from its config.json):

- parameters by owner: the generator expert's and the detector expert's block weights, weights both
  streams share (model.experts = "shared"), and the embeddings, heads and DIGA projector; the frozen
  VAE apart.
- FLOPs of the model per training sample, forward + backward of every pass each phase runs (the
  generation pass, the DIGA teacher pass, L_auth's detector pass on x0_hat with its input-gradient
  backward and, in joint mode with g2d, its second generation pass; the det phase's pass over the
  batch and as many fake-pool images), averaged over the phase schedule, plus the fake-pool refill's
  sampler passes spread over the steps between refills. A pass runs the stream whose output it does
  not use only as far as the other stream reads its keys (the model's skip of unused work).
  Matrix multiplies are 2 FLOPs per multiply-add, a backward with weight gradients twice its forward,
  one with input gradients only once. Norms, RoPE, activations and the loss are left out.
- the VAE's FLOPs apart: decoding (the refill's samples; L_auth's x0_hat with the gradient through
  the decoder, i.e. forward + input-gradient backward) and encoding (the training images, only when
  the data is not packed as latents; with d2g also what the detection passes encode whatever the data,
  `throughput.vae_step_flops`).
- memory per GPU, the peak at the end of a phase's forward: fp32 parameters, the previous step's
  gradients (freed only after the forward), AdamW's two fp32 moments and the fp32 EMA copy, all
  divided by world_size under FSDP (plus two all-gathered blocks at train.fsdp_param_dtype); bf16
  weight copies that autocast saves for the backward (GPU, unless FSDP gathers bf16); the fake pool;
  the batch buffers; the frozen VAE's weights; and the activations the backward keeps of one
  micro-batch (train.batch_size), per layer and token from the tensors each op saves (fused ops and
  flash attention: no T x T scores), at 2 bytes under bf16 autocast (GPU) or 4 (CPU), plus the
  transient detector pass of L_auth on top of what the passes before it keep (in a joint phase the
  detection pass comes after it) and, with a VAE, the decoder activations of L_auth's decode (with
  d2g also the encoder's of its encode(decode(x0_hat)), transient like its detector pass).

Not counted: the CUDA context and caching-allocator slack (reserve ~10%), NCCL buffers, torch.compile
or CUDA-graph pools, the loader's workers, the refill's transient sampler memory, the backward's own
temporaries. tests/test_estimate.py checks the memory estimate against the live tensor bytes
measured while small configs train on the CPU (within 15%).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config, ModelConfig, mmsa_layer_set
from ..phase_modes import Phase, schedule
from .throughput import (VaeGeometry, expert_matrix_params, ffn_width, stream_tokens, vae_geometry, vae_params,
                         vae_step_flops)

GiB = 2**30


@dataclass(frozen=True)
class Estimate:
    """The sizes of one config's run; `lines()` formats them."""
    params: dict[str, int]        # gen_expert, det_expert, shared, embeddings_heads, total, vae
    tokens: tuple[int, int]       # (N_g, N_d + R): generator and detector stream tokens of a sample
    flops: dict[str, float]       # per sample: model, model_<phase>, refill, vae_decode, vae_encode
    memory: dict[str, float]      # bytes per GPU: params, grads, adamw, ema, ..., activations, total
    world_size: int
    dtype: str                    # "bf16" (autocast on a GPU) or "fp32" (CPU)
    first_fill: float = 0.0       # bytes per GPU at the first fake-pool fill (0: no pool)
    vae_source: str = ""          # where the VAE's geometry came from; '' = pixel space

    def lines(self) -> list[str]:
        p, f, m = self.params, self.flops, self.memory
        out = [f"parameters: {_count(p['total'])} (generator expert {_count(p['gen_expert'])}, detector expert "
               f"{_count(p['det_expert'])}, shared {_count(p['shared'])}, embeddings/heads/projector "
               f"{_count(p['embeddings_heads'])})" + (f"; frozen VAE {_count(p['vae'])}" if p["vae"] else ""),
               f"tokens per stream: generator {self.tokens[0]}, detector {self.tokens[1]} (with registers)",
               f"FLOPs per sample (fwd+bwd, phases averaged, refill included): model {_flops(f['model'])} ("
               + ", ".join(f"{k.removeprefix('model_')} {_flops(v)}" for k, v in f.items() if k.startswith("model_"))
               + f", refill {_flops(f['refill'])})"
               + (f"; VAE decode {_flops(f['vae_decode'])}, encode {_flops(f['vae_encode'])} (on-the-fly only)"
                  if self.vae_source else "")
               + (f", encode for d2g's detection passes {_flops(f['vae_encode_detect'])}"
                  if f.get("vae_encode_detect") else ""),
               f"memory per GPU ({self.dtype}, world_size {self.world_size}): {_bytes(m['total'])} = "
               + ", ".join(f"{k} {_bytes(v)}" for k, v in m.items() if k != "total" and v)]
        if self.first_fill:
            out.append(f"first fake-pool fill (phases.pool_size images in one batch): {_bytes(self.first_fill)}")
        if self.vae_source:
            out.append(f"VAE geometry: {self.vae_source}")
        return out


def _count(n: float) -> str:
    return (f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3
            else f"{n:.0f}")


def _bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _flops(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP" if x >= 1e11 else f"{x / 1e9:.2f} GFLOP"


# ----------------------------------------------------------------------------- parameters


def param_counts(m: ModelConfig) -> dict[str, int]:
    """Parameters by owner, from the model built on the meta device (no memory, no init cost)."""
    from ..model import UniGenDet

    with torch.device("meta"):
        model = UniGenDet(m)
    counts = {"gen_expert": 0, "det_expert": 0, "shared": 0, "embeddings_heads": 0}
    for name, p in model.named_parameters():
        if ".experts.g." in name:
            counts["gen_expert"] += p.numel()
        elif ".experts.d." in name:
            counts["det_expert"] += p.numel()
        elif name.startswith("blocks.") or name == "stream_embed":
            counts["shared"] += p.numel()
        else:
            counts["embeddings_heads"] += p.numel()
    counts["total"] = sum(counts.values())
    counts["block"] = sum(p.numel() for p in model.blocks[0].parameters())  # one layer, both experts
    return counts


# ----------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Pass:
    """One pass through the backbone: which stream's output it uses, how far, how many of them."""
    used: str            # "g" or "d"
    layers: int          # layers it runs (align_layer for the DIGA teacher)
    full_other: bool     # the other stream in full in every layer (L_MMSA needs both streams' queries)


def _stream_layers(m: ModelConfig, p: Pass) -> tuple[int, int]:
    """(layers in full, key-only layers) of the stream whose output the pass does not use."""
    if p.full_other:
        return p.layers, 0
    reads = m.g2d if p.used == "g" else m.d2g
    last = max((i for i in mmsa_layer_set(m) if i <= p.layers), default=0) if reads else 0
    return (max(last - 1, 0), 1) if last else (0, 0)


def pass_forward_flops(m: ModelConfig, p: Pass, tokens: dict[str, int]) -> float:
    """Forward FLOPs of one pass of one sample: the backbone's matrices and attention."""
    other = "d" if p.used == "g" else "g"
    full, key_only = _stream_layers(m, p)
    D, H, Hkv = m.width // m.heads, m.heads, m.kv_heads
    kv = 2 * m.width * 2 * Hkv * D  # the k, v rows of qkv, per token
    dense = 2.0 * expert_matrix_params(m) * (tokens[p.used] * p.layers + tokens[other] * full) \
        + kv * tokens[other] * key_only
    t_u, t_o = tokens[p.used], tokens[other]
    mmsa = mmsa_layer_set(m)
    pairs = t_u * t_u * p.layers + t_o * t_o * full
    reads_other = m.g2d if p.used == "g" else m.d2g
    other_reads = m.d2g if p.used == "g" else m.g2d
    for i in range(1, p.layers + 1):
        if i in mmsa and reads_other and (i <= full + key_only):
            pairs += t_u * t_o
        if i in mmsa and other_reads and i <= full:
            pairs += t_o * t_u
    return dense + 4.0 * pairs * H * D


def phase_passes(cfg: Config, phase: Phase) -> list[tuple[Pass, float, float]]:
    """(pass, images per sample, backward factor) of each backbone pass a step of `phase` runs:
    factor 2 = weight and input gradients, 1 = input gradients only, 0 = no backward."""
    m, loss = cfg.model, cfg.loss
    out = []
    if phase.generates:
        out.append((Pass("g", m.depth, False), 1.0, 2.0))
        if loss.lambda_dig * loss.w_align > 0:
            out.append((Pass("d", m.align_layer, False), 1.0, 0.0))  # sg(h_D^l(x0)), no grad
        if loss.lambda_dig * loss.w_auth > 0:
            if phase.trains_detector and m.g2d:
                out.append((Pass("g", m.depth, False), 1.0, 2.0))  # x0_hat with the detector held constant
            out.append((Pass("d", m.depth, False), 1.0, 1.0))  # detector on x0_hat: input gradient only
    if phase.detects:  # the batch and as many fake-pool images
        out.append((Pass("d", m.depth, loss.lambda_att > 0), 2.0, 2.0))
    return out


def _embed_head_flops(m: ModelConfig, tokens: dict[str, int], in_g: int, projector: bool) -> float:
    """Forward FLOPs of the patch embeddings, heads and projector of a generation sample (small)."""
    hidden = m.projector_hidden or 4 * m.width
    f = 2.0 * tokens["g"] * in_g * m.width * 2  # patch embedding in, velocity head out
    return f + (2.0 * tokens["g"] * 2 * m.width * hidden if projector else 0.0)


def model_flops(cfg: Config, vae: VaeGeometry | None) -> dict[str, float]:
    """Model FLOPs per training sample: per phase, averaged over the schedule, and the refill's."""
    m = cfg.model
    t_g, t_d = stream_tokens(m)
    tokens = {"g": t_g, "d": t_d}
    in_g = (m.latent_channels * m.latent_patch_size ** 2) if vae else 3 * m.patch_size ** 2
    out: dict[str, float] = {}
    phases = schedule(cfg.phases.mode)
    for phase in phases:
        total = 0.0
        for p, images, backward in phase_passes(cfg, phase):
            total += images * (1.0 + backward) * pass_forward_flops(m, p, tokens)
        if phase.generates:
            total += 3.0 * _embed_head_flops(m, tokens, in_g, cfg.loss.w_align > 0)
        out[f"model_{phase.name}"] = total
    gen_fwd = pass_forward_flops(m, Pass("g", m.depth, False), tokens) + _embed_head_flops(m, tokens, in_g, False)
    ph = cfg.phases
    refill = ph.refill_count * ph.sampler_steps * gen_fwd / (ph.refill_every * cfg.train.batch_size)
    out["refill"] = refill if any(p.uses_fake_pool for p in phases) else 0.0
    out["model"] = sum(out[f"model_{p.name}"] for p in phases) / len(phases) + out["refill"]
    return out


# ----------------------------------------------------------------------------- memory


def layer_activation_elements(m: ModelConfig, full: bool) -> int:
    """Elements per token that one layer keeps for the backward of a stream: in full, the two
    residual sums and normed inputs (4 C), q and k before and after their norm and RoPE, v, the
    attention output ((2H + 3Hkv + H) D), the SwiGLU input and output (3 F), and per-row fp32
    statistics (two rmsnorm rows, q/k norms, the attention's log-sum-exp per head); key-only: the
    residual sum, the normed input, k before and after, v (2 C + 3 Hkv D)."""
    C, F, D, H, Hkv = m.width, ffn_width(m), m.width // m.heads, m.heads, m.kv_heads
    if not full:
        return 2 * C + 3 * Hkv * D + 1 + Hkv
    return 4 * C + (3 * H + 3 * Hkv) * D + 3 * F + 2 + H + Hkv + H


def pass_activation_elements(m: ModelConfig, p: Pass, tokens: dict[str, int]) -> float:
    """Elements a pass keeps for its backward, per image."""
    other = "d" if p.used == "g" else "g"
    full, key_only = _stream_layers(m, p)
    per_full, per_key = layer_activation_elements(m, True), layer_activation_elements(m, False)
    return (tokens[p.used] * p.layers * per_full + tokens[other] * (full * per_full + key_only * per_key)
            + 4 * m.width * (tokens["g"] + tokens["d"]))  # embeddings and heads: a few (T, C) tensors


def vae_decode_activation_elements(vae: VaeGeometry, image_size: int) -> float:
    """Elements diffusers' decoder keeps for the backward of one image: about six (c, side, side)
    maps per ResnetBlock2D (two group norms, two SiLUs, two conv inputs) and two per upsampling."""
    chans, side = tuple(reversed(vae.block_out_channels)), image_size // vae.downsample
    total = 12.0 * chans[0] * side * side  # mid block
    for i, c in enumerate(chans):
        total += 6.0 * c * side * side * (vae.layers_per_block + 1)
        if i < len(chans) - 1:
            side *= 2
            total += 2.0 * c * side * side
    return total


def vae_encode_activation_elements(vae: VaeGeometry, image_size: int) -> float:
    """Elements diffusers' encoder keeps for an input-gradient backward of one image, counted as
    `vae_decode_activation_elements` (layers_per_block ResnetBlock2Ds per down block)."""
    chans, side, total = vae.block_out_channels, image_size, 0.0
    for i, c in enumerate(chans):
        total += 6.0 * c * side * side * vae.layers_per_block
        if i < len(chans) - 1:
            side //= 2
            total += 2.0 * c * side * side
    return total + 12.0 * chans[-1] * side * side  # mid block


def memory(cfg: Config, vae: VaeGeometry | None, params: dict[str, int], world_size: int,
           bf16: bool) -> dict[str, float]:
    """Bytes per GPU at the peak (the module docstring says what is in it)."""
    m, t = cfg.model, cfg.train
    phases = schedule(cfg.phases.mode)
    P = params["total"]
    owners = {"gen": params["gen_expert"], "det": params["det_expert"], "shared": params["shared"]}
    # embeddings / heads / projector split by owner is small; count them with every phase's gradients
    trained = max(sum(owners[o] for o in p.trainable) + params["embeddings_heads"] for p in phases)
    shard = world_size if t.fsdp else 1
    act_bytes = 2 if bf16 else 4
    t_g, t_d = stream_tokens(m)
    tokens = {"g": t_g, "d": t_d}
    B, S = t.batch_size, m.image_size
    acts = 0.0
    for phase in phases:
        # in the order the phase runs its passes: a transient pass adds to what is kept so far only
        kept, peak = 0.0, 0.0
        for p, images, backward in phase_passes(cfg, phase):
            elems = images * B * pass_activation_elements(m, p, tokens) * act_bytes
            if backward == 2.0:
                kept += elems
            elif backward == 1.0:  # L_auth's detector pass: forward + backward inside the gen phase's forward
                if vae is not None:  # on decode(x0_hat), whose decoder activations stay for the backward
                    kept += B * vae_decode_activation_elements(vae, S) * act_bytes
                    if m.d2g:  # and the encode of decode(x0_hat) it reads
                        elems += B * vae_encode_activation_elements(vae, S) * act_bytes
                peak = max(peak, kept + elems)
        acts = max(acts, peak, kept)
    gathered_dtype = 2 if (t.fsdp and t.fsdp_param_dtype == "bfloat16") else 4
    out = {
        "params": 4.0 * P / shard,
        "grads": 4.0 * trained / shard,
        "adamw": 8.0 * P / shard,
        "ema": 4.0 * P / shard,
        "gathered_blocks": 2.0 * params["block"] * gathered_dtype if t.fsdp else 0.0,
        # autocast's bf16 copies of the weights, saved for the backward (FSDP with bf16 gathers: none)
        "weight_copies": 2.0 * P if bf16 and gathered_dtype == 4 else 0.0,
        # the images, and with d2g their latents beside them
        "fake_pool": 4.0 * cfg.phases.pool_size * (3 * S * S + (vae.latent_channels * (S // vae.downsample) ** 2
                                                                 if vae and m.d2g else 0))
        if any(p.uses_fake_pool for p in phases) else 0.0,
        "batch": 2 * 4.0 * B * 3 * S * S + (2 * 4.0 * B * 2 * vae.latent_channels * (S // vae.downsample) ** 2
                                              if vae else 0.0),
        "vae": (2.0 if bf16 else 4.0) * params["vae"],
        "activations": acts,
    }
    out["total"] = sum(out.values())
    return out


def first_fill_bytes(cfg: Config, vae: VaeGeometry | None, mem: dict[str, float], bf16: bool) -> float:
    """Peak of the first fake-pool fill (phases.pool_size images in one no-grad sampler batch, before
    any activation is kept): the run's fixed memory plus the largest transient of one layer (the two
    residual tensors, the SwiGLU's input, output and gate/up) over every token the sampler pass runs,
    and with a VAE the decoder's largest step: its last upsampling conv, two maps of twice the first
    block's channels at full resolution."""
    phases = schedule(cfg.phases.mode)
    if not any(p.uses_fake_pool for p in phases):
        return 0.0
    m, n, act = cfg.model, cfg.phases.pool_size, 2 if bf16 else 4
    t_g, t_d = stream_tokens(m)
    tokens = t_g + (t_d if m.g2d else 0)
    layer = tokens * (2 * m.width + 3 * ffn_width(m)) * act
    decode = 4.0 * vae.block_out_channels[0] * m.image_size ** 2 * act if vae else 0.0
    fixed = mem["total"] - mem["activations"]
    return fixed + n * max(layer, decode)


def estimate(cfg: Config, *, world_size: int | None = None, bf16: bool | None = None) -> Estimate:
    """Sizes of a run of `cfg` (see the module docstring). world_size: GPUs the run shards over
    (default: 8 under train.fsdp, else 1); bf16: autocast activations (default: unless train.device
    is 'cpu')."""
    if world_size is None:
        world_size = 8 if cfg.train.fsdp else 1
    if bf16 is None:
        bf16 = cfg.train.device != "cpu"
    vae = vae_geometry(cfg.model)
    params = param_counts(cfg.model)
    params["vae"] = vae_params(vae) if vae else 0
    flops = {**model_flops(cfg, vae), **vae_step_flops(cfg, vae)}
    mem = memory(cfg, vae, params, world_size, bf16)
    params.pop("block")
    return Estimate(params, stream_tokens(cfg.model), flops, mem, world_size, "bf16" if bf16 else "fp32",
                    first_fill_bytes(cfg, vae, mem, bf16), vae.source if vae else "")
