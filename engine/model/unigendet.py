"""UniGenDet: one transformer with a generator expert and a detector expert (docs/design.md §1).

Two kinds of pass, both through the same MoT layers and MMSA joint attention:
- generation sample: G = tokens of x_t; D = the detector's view of x_t when g2d is on, else absent.
  x_t is an image, or with model.vae a normalised VAE latent (then g2d is off: the detector stream
  reads pixels only, and `vae` decodes what the generator makes).
- detection sample:  G = the image's tokens at t = 0 (when d2g lets D read them, else absent), with
                     model.vae the tokens of its latent (the VAE's normalised posterior mean);
                     D = the image's tokens, then registers; the CLS register feeds the detector head.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import ModelConfig, check_model, gen_grid, mmsa_layer_set
from ..ops import axial_rope_tables
from .block import AttentionStats, MoTBlock, StreamState
from .embeddings import DetStreamEmbed, GenStreamEmbed, resize_token_grid
from .heads import DetectorHead, GeneratorHead


class GenOutput(NamedTuple):
    velocity: Tensor        # (B, K, s, s) predicted v_hat (pixels: K = 3, s = S; latents: the VAE's grid)
    hidden: Tensor | None   # (B, N, C) G hidden state after layer `capture_layer`, if asked


class DetOutput(NamedTuple):
    logit: Tensor | None    # (B,) authenticity logit, label 1 = generated (None if features_only)
    hidden: Tensor | None   # (B, N, C) D image-token hidden after `capture_layer`, final-normed
    attention: tuple[AttentionStats, ...] | None = None  # per MMSA layer, with return_attention


OWNERS = ("gen", "det", "shared")


class UniGenDet(nn.Module):
    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        check_model(cfg)
        self.cfg = cfg
        C, p = cfg.width, cfg.patch_size
        ffn = int(cfg.mlp_ratio * C + 7) // 8 * 8
        # what the generator stream denoises, (K, s, s): the image, or the VAE latent with model.vae
        self.latent = bool(cfg.vae)
        channels, side, gen_patch = ((cfg.latent_channels, cfg.image_size // cfg.latent_downsample,
                                      cfg.latent_patch_size) if self.latent else (3, cfg.image_size, p))
        self.x_shape = (channels, side, side)
        self.gen_grid, self.det_grid = gen_grid(cfg), cfg.image_size // p  # token grid sides of G and D
        self._vae = None  # the FrozenVAE (or a loader of it), `attach_vae`; never a submodule
        self.gen_embed = GenStreamEmbed(side, gen_patch, C, cfg.num_classes, channels)
        self.det_embed = DetStreamEmbed(cfg.image_size, p, C, cfg.registers)
        # with shared experts a learned stream embedding tells the streams apart
        self.stream_embed = nn.Parameter(torch.zeros(2, C)) if cfg.experts == "shared" else None
        self.blocks = nn.ModuleList(
            MoTBlock(C, cfg.heads, cfg.kv_heads, ffn, cfg.experts, cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.gen_head = GeneratorHead(C, gen_patch, cfg.norm_eps, channels)
        self.det_head = DetectorHead(C, cfg.norm_eps, cls_index=(cfg.image_size // p) ** 2)
        # image tokens of a detection sample as (offset, count): G rows [0, N); D rows [0, N), registers after
        self.g_image_tokens = (0, self.gen_grid ** 2)
        self.d_image_tokens = (0, (cfg.image_size // p) ** 2)
        # DIGA projector P: generator hidden -> detector feature space
        hidden = cfg.projector_hidden or 4 * C  # 0 = 4 C
        act = nn.GELU() if cfg.projector_act == "gelu" else nn.SiLU()
        self.projector = nn.Sequential(nn.Linear(C, hidden), act, nn.Linear(hidden, C))
        hd = C // cfg.heads
        for s, grid, registers in (("g", self.gen_grid, 0), ("d", self.det_grid, cfg.registers)):
            cos, sin = axial_rope_tables(grid, hd, cfg.rope_base, suffix=registers)  # (N + R, D/2)
            self.register_buffer(f"rope_cos_{s}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{s}", sin, persistent=False)
        self.mask = dict(g2d=cfg.g2d, d2g=cfg.d2g, g_causal=cfg.g_causal, d_causal=cfg.d_causal)
        # per layer: self.mask in the MMSA layers (model.mmsa_layers), else no cross-stream reads
        self.mmsa_layers = mmsa_layer_set(cfg)
        self.layer_masks = [self.mask if i in self.mmsa_layers else {**self.mask, "g2d": False, "d2g": False}
                            for i in range(1, cfg.depth + 1)]
        # a pass computes of the stream whose output it does not use only the keys its other stream
        # reads (`_backbone`); False computes that stream in full (same outputs; for comparisons)
        self.skip_unused = True
        self.apply(_init_linear)
        nn.init.zeros_(self.gen_head.proj.weight)

    # ------------------------------------------------------------------ latent space

    def attach_vae(self, vae) -> None:
        """The frozen VAE of a latent model (model.vae): a `FrozenVAE`, or a zero-argument function that
        loads it on first use (detection needs it only with d2g). Kept out of the modules and state dict."""
        if not self.latent:
            raise ValueError("attach_vae: this model works in pixel space (model.vae is empty)")
        self._vae = vae

    @property
    def vae(self):
        """The attached FrozenVAE (loaded now if a loader was attached); None in pixel space."""
        if not self.latent:
            return None
        if self._vae is None:
            raise ValueError(f"this model generates latents of the VAE {self.cfg.vae!r}; attach it first "
                             "(model.attach_vae(unigendet.vae.load_vae(path)))")
        if callable(self._vae) and not hasattr(self._vae, "decode"):
            self._vae = self._vae()
        return self._vae

    def to_pixels(self, x: Tensor) -> Tensor:
        """What the generator stream makes, (B, K, s, s), as images (B, 3, S, S) the detector reads:
        decoded latents with model.vae (differentiable w.r.t. x), else x itself."""
        return self.vae.decode(x) if self.latent else x

    def detector_latents(self, images: Tensor, latents: Tensor | None = None) -> Tensor:
        """The latents (B, K, s, s) a detection sample's generator stream reads for `images` (B, 3, S, S):
        `latents` when the caller has them, else the attached VAE's posterior means of the images."""
        if latents is None:
            latents = self.vae.encode_latents(images)
        if latents.shape[1:] != self.x_shape:
            raise ValueError(f"detection_pass: latents must be (B, {', '.join(map(str, self.x_shape))}), "
                             f"got {tuple(latents.shape)}")
        return latents.to(images.dtype)

    def teacher_on_gen_grid(self, hidden: Tensor) -> Tensor:
        """Detector features (B, N_D, C) on the generator's token grid (B, N_G, C): token i with token i
        when the grids are equal, else resized bilinearly."""
        return resize_token_grid(hidden, self.gen_grid)

    # ------------------------------------------------------------------ parameter ownership

    def param_owner(self, name: str) -> str:
        """'gen', 'det' or 'shared': which expert a parameter belongs to (phases freeze by this)."""
        if name.startswith(("gen_embed.", "gen_head.", "projector.")) or ".experts.g." in name:
            return "gen"
        if name.startswith(("det_embed.", "det_head.")) or ".experts.d." in name:
            return "det"
        return "shared"

    def params_by_owner(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list] = {o: [] for o in OWNERS}
        for name, p in self.named_parameters():
            groups[self.param_owner(name)].append((name, p))
        return groups

    # ------------------------------------------------------------------ passes

    def _last_read_layer(self, reader: str, end: int) -> int:
        """The last layer <= end (1-based) where `reader`'s queries read the other stream's keys; 0: none."""
        if not self.mask["g2d" if reader == "g" else "d2g"]:
            return 0
        last = 0  # a plain loop: torch.compile cannot trace max() over a generator with default=
        for i in self.mmsa_layers:
            if i <= end:
                last = max(last, i)
        return last

    def _needs_stream(self, reader: str, end: int) -> bool:
        """Whether a pass that uses only `reader`'s output (through layer `end`) needs the other stream."""
        return not self.skip_unused or self._last_read_layer(reader, end) > 0

    def _backbone(self, states: dict[str, StreamState], capture_layer: int | None, stop_early: bool = False,
                  constant_experts: frozenset[str] = frozenset(), attention: list | None = None,
                  used: str | None = None):
        """Run the MoT layers; also return the states after layer `capture_layer` (1-based).

        stop_early: stop at `capture_layer` (when only the captured features are wanted);
        constant_experts: experts ("g", "d") whose block weights are used without gradient;
        attention: a list that collects each MMSA layer's `AttentionStats` (None: not collected);
        used: the one stream whose output (final or captured) the caller reads, None = both. The other
        stream then runs in full up to the last layer whose `used` queries read its keys, there as
        keys and values only (`MoTBlock` key_only), and not at all after (nor at all if no layer
        reads it); its entries in the returned states are missing. Not with `attention` (L_MMSA
        needs both streams' queries)."""
        if self.stream_embed is not None:
            index = {"g": 0, "d": 1}
            states = {s: (x + self.stream_embed[index[s]].to(x.dtype), r) for s, (x, r) in states.items()}
        rope = {s: (getattr(self, f"rope_cos_{s}"), getattr(self, f"rope_sin_{s}")) for s in states}
        last = {}  # stream whose output is unused -> the last layer that needs its keys (0: none)
        if used is not None and attention is None and self.skip_unused:
            end = capture_layer if stop_early else len(self.blocks)
            last = {s: self._last_read_layer(used, end) for s in states if s != used}
            states = {s: st for s, st in states.items() if last.get(s, 1) > 0}
        captured = None
        for i, block in enumerate(self.blocks, start=1):
            key_only = frozenset(s for s, layer in last.items() if layer == i)
            states = block(states, rope, self.layer_masks[i - 1], constant_experts, attention, key_only)
            if i == capture_layer:
                captured = states
                if stop_early:
                    break
        return states, captured

    def generation_pass(self, x_t: Tensor, t: Tensor, class_ids: Tensor | None = None,
                        capture_layer: int | None = None, constant_detector: bool = False) -> GenOutput:
        """x_t: (B, K, s, s) (`x_shape`), t: (B,) in [0, 1], class_ids: (B,) or None -> GenOutput.

        constant_detector: the detector-owned weights the pass reads with g2d (detector embedding
        and expert) are used as constants, so no gradient of the output reaches them; the values
        are the same as without."""
        states = {"g": (self.gen_embed(x_t, t, class_ids), None)}
        if self.cfg.g2d and self._needs_stream("g", len(self.blocks)):
            states["d"] = (self.det_embed(x_t, constant=constant_detector), None)
        constant = frozenset({"d"}) if constant_detector else frozenset()
        final, cap = self._backbone(states, capture_layer, constant_experts=constant, used="g")
        hidden = None
        if cap is not None:
            x, res = cap["g"]
            hidden = x + res
        return GenOutput(self.gen_head(*final["g"]), hidden)

    def detection_pass(self, x: Tensor, capture_layer: int | None = None, features_only: bool = False,
                       return_attention: bool = False, latents: Tensor | None = None) -> DetOutput:
        """x: (B, 3, S, S) image under test -> DetOutput (logit; final-normed D features if asked).

        latents: (B, K, s, s) the normalised posterior means of x (`FrozenVAE.mean_latents`), which a
        latent model's generator stream reads with d2g; None = encoded from x now by the attached VAE
        (differentiable w.r.t. x). Ignored in pixel space and without d2g.

        features_only: run only the layers up to `capture_layer` and return logit = None (the DIGA
        teacher pass needs nothing above layer l); return_attention: also return each MMSA layer's
        queries, keys and attention lse (`AttentionStats`, for L_MMSA; empty unless g2d and d2g)."""
        if features_only and capture_layer is None:
            raise ValueError("detection_pass: features_only needs capture_layer")
        states = {"d": (self.det_embed(x), None)}
        end = capture_layer if features_only else len(self.blocks)
        # G = the clean image's tokens (t = 0) for D to read
        if self.cfg.d2g and (return_attention or self._needs_stream("d", end)):
            clean = self.detector_latents(x, latents) if self.latent else x
            states["g"] = (self.gen_embed(clean, x.new_zeros(x.shape[0])), None)
        attention = [] if return_attention else None
        final, cap = self._backbone(states, capture_layer, stop_early=features_only, attention=attention, used="d")
        hidden = None
        if cap is not None:
            x_d, res_d = cap["d"]
            n = self.det_head.cls_index
            hidden = self.det_head.normed(x_d[:, :n], None if res_d is None else res_d[:, :n])  # image tokens only
        return DetOutput(None if features_only else self.det_head(*final["d"]), hidden,
                         None if attention is None else tuple(attention))

    def forward(self, kind: str, *args, **kwargs):
        """`model("gen", x_t, t, class_ids)` or `model("det", x)`; one entry point for DDP / compile."""
        if kind == "gen":
            return self.generation_pass(*args, **kwargs)
        if kind == "det":
            return self.detection_pass(*args, **kwargs)
        raise ValueError(f"UniGenDet.forward: kind must be 'gen' or 'det', got {kind!r}")

    @torch.no_grad()
    def p_fake(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) in [-1, 1] -> (B,) probability that each image is generated."""
        return torch.sigmoid(self("det", images).logit.float())


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
