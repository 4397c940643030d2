"""Training phases: which losses a step computes and which experts it trains (docs/design.md §1).

The phases and the modes that schedule them are data (engine/phase_modes.py). One function,
`phase_loss`, assembles the terms of every phase from two switches (does the phase generate, does it
detect), so `gen`, `det`, `joint` and `diga` share one code path:
- gen:   L_gen = L_flow + lambda_dig * (w_align * L_align + w_auth * L_auth); trains gen + shared.
- det:   L_det = BCE on real (y=0), external fakes (y=1) and fake-pool images (y=1), plus
         lambda_att * L_MMSA of those detection passes when loss.lambda_att > 0; trains det + shared.
- joint: L_gen + L_det in one step; trains everything (the published stage I, GDUF).
- diga:  L_gen with the detector expert frozen; trains the generator only (the published stage II).
L_auth never trains the detector, whatever the phase trains: the detector that scores x0_hat runs
with constant weights (its gradient reaches x0_hat only), and when the phase also trains the detector
while the generation pass reads it (joint mode with g2d), x0_hat comes from a second generation pass
with the detector-owned weights held constant (same values; the gradient reaches the generator's and
shared weights only). L_flow and L_align keep their gradients to the detector expert there.

Latent space (model.vae): the generator's x0 is the batch's VAE latent, the detector still reads
pixels. L_auth scores decode(x0_hat): the gradient flows through the frozen decoder (whose weights
never get one) to the generator. L_align's teacher is the detector's features of the real pixels,
resized onto the generator's token grid when the grids differ. With model.d2g every detection pass
also reads the posterior means of its pixels in the generator stream: the step's precomputed means
of its real images and the pool's stored latents of its fakes (`det_latents`), else encoded from the
pixels (augmented inputs, and decode(x0_hat) in L_auth, whose gradient then flows through the
frozen encoder too).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import LossConfig
from ..losses import (BCEGroup, LossTerms, combined_bce_align, flow_loss, mmsa_consistency, one_step_estimate,
                      sample_flow_inputs)
from ..phase_modes import Phase
from ..rng import Gen, batch_rand


def unwrap(model: nn.Module) -> nn.Module:
    """The UniGenDet inside a DDP / compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_trainable(model: nn.Module, phase: Phase) -> None:
    """requires_grad on exactly the parameters the phase updates (others get no gradient at all)."""
    core = unwrap(model)
    for name, p in core.named_parameters():
        p.requires_grad_(core.param_owner(name) in phase.trainable)


class _ThroughImagesOnly(torch.autograd.Function):
    """logit = detect(images) with the detector's weights as constants: gradient reaches `images` only.

    The detector scores each sample on its own, so d logit_i / d images_j = 0 for i != j and one
    backward pass of sum(logit) gives every row's input gradient J_i = d logit_i / d images_i. It
    runs here, in the forward, in a graph of its own (no weight gradient is computed or kept); the
    backward is then J * grad per row. Unlike swapping in detached weights (functional_call), this
    leaves the module's parameters alone, so it also holds when FSDP2 swaps gathered parameters in
    and out around each block, and no backward runs nested inside another."""

    @staticmethod
    def forward(ctx, images: Tensor, detect) -> Tensor:
        with torch.enable_grad():
            leaf = images.detach().requires_grad_()
            logit = detect(leaf)  # (B,)
            (jac,) = torch.autograd.grad(logit.float().sum(), leaf)  # (B, 3, S, S)
        ctx.save_for_backward(jac)
        return logit.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (jac,) = ctx.saved_tensors
        return grad.to(jac.dtype).view(-1, *[1] * (jac.dim() - 1)) * jac, None


def frozen_detection_logit(model: nn.Module, images: Tensor) -> Tensor:
    """Detector logit of `images` (B, 3, S, S) -> (B,) with every weight held fixed: gradient flows
    to `images` only."""
    core = unwrap(model)
    if not images.requires_grad:
        with torch.no_grad():
            return core("det", images).logit
    return _ThroughImagesOnly.apply(images, lambda x: core("det", x).logit)


def authenticity_logit(model: nn.Module, phase: Phase, x_t: Tensor, t: Tensor, class_ids: Tensor | None,
                       velocity: Tensor) -> Tensor:
    """The detector's logit (B,) of x0_hat = x_t - t v_hat (decoded first in latent space: the image
    the detector would see), differentiable w.r.t. the generator only.

    velocity: v_hat (B, K, s, s) of the step's generation pass. When the phase trains detector-owned
    weights and that pass read them (g2d), v_hat is recomputed with those weights held constant, so
    L_auth's gradient cannot reach the detector through v_hat either."""
    if phase.trains_detector and unwrap(model).cfg.g2d:
        velocity = model("gen", x_t, t, class_ids, constant_detector=True).velocity
    core = unwrap(model)
    return frozen_detection_logit(model, core.to_pixels(one_step_estimate(x_t, t, velocity)))


def drop_labels(class_ids: Tensor, p: float, generator: Gen) -> Tensor:
    """Replace each label by -1 ("no class") with probability p (classifier-free guidance training)."""
    if p <= 0:
        return class_ids
    drop = batch_rand(class_ids.shape, generator, device=class_ids.device) < p
    return torch.where(drop, torch.full_like(class_ids, -1), class_ids)


def phase_loss(model: nn.Module, phase: Phase, images: Tensor, is_fake: Tensor, class_ids: Tensor,
               fakes: Tensor | None, loss_cfg: LossConfig, generator: Gen, latents: Tensor | None = None,
               augment=None, det_latents: tuple[Tensor, Tensor | None] | None = None) -> LossTerms:
    """Loss of one step of `phase`.

    images: (B, 3, S, S) in [-1, 1]; is_fake: (B,) 1 for external fakes; class_ids: (B,) (-1 = none);
    fakes: (F, 3, S, S) images from the fake pool (det phases); latents: (B, K, s, s) normalised VAE
    latents of `images` (latent models, generating phases), the generator's x0.
    augment: detector-input augmentation (detector_augment.DetectorAugment) applied to the det pass's
    whole batch, real and generated rows alike; None = off.
    det_latents: (means (B, K, s, s) of `images`, latents (F, K, s, s) of `fakes` or None): what the
    detection passes' generator stream reads (latent models with d2g); None = encoded from the pixels.
    """
    core = unwrap(model)
    mcfg = core.cfg
    w_align = loss_cfg.lambda_dig * loss_cfg.w_align
    w_auth = loss_cfg.lambda_dig * loss_cfg.w_auth
    groups: list[BCEGroup] = []
    student = teacher = flow = align_scale = att = None
    if phase.generates:
        # The generator learns from real images only. External fakes stay in the batch with weight 0
        # (no data-dependent shapes, no host sync: CUDA-graph safe); they cost their share of compute.
        real = (is_fake < 0.5).float()  # (B,)
        kept = real.sum().clamp_min(1.0)
        row_weights = real / kept  # (B,), sums to 1 when the batch holds a real image
        if core.latent and latents is None:
            raise ValueError("phase_loss: a latent model's generating phase needs the batch's latents")
        x0, B = (latents if core.latent else images), images.shape[0]
        ids = drop_labels(class_ids, mcfg.class_dropout, generator)
        ids = ids if mcfg.num_classes > 0 else None
        x_t, t, eps = sample_flow_inputs(x0, generator)
        layer = mcfg.align_layer if w_align > 0 else None
        out = model("gen", x_t, t, ids, capture_layer=layer)
        flow = flow_loss(out.velocity, x0, eps, row_weights)
        if w_align > 0:
            with torch.no_grad():  # sg(h_D^l(x0)): the real image as a detection sample
                teacher = model("det", images, capture_layer=layer, features_only=True,
                                latents=None if det_latents is None else det_latents[0]).hidden  # (B, N_D, C)
                teacher = core.teacher_on_gen_grid(teacher).flatten(0, 1)  # (B*N_G, C)
            student = core.projector(out.hidden).flatten(0, 1)  # (B*N, C)
            keep = real.repeat_interleave(student.shape[0] // B).unsqueeze(1) > 0  # (B*N, 1)
            teacher = torch.where(keep, teacher, student.detach().to(teacher.dtype))  # fake rows: 1 - cos = 0
            align_scale = B / kept
        if w_auth > 0:
            logit = authenticity_logit(model, phase, x_t, t, ids, out.velocity)
            groups.append(BCEGroup("auth", logit, torch.zeros_like(logit), w_auth, row_weights))
    if phase.detects:
        det_images, targets = images, is_fake.float()
        means = None if det_latents is None else det_latents[0]
        if fakes is not None:
            det_images = torch.cat([images, fakes.to(images.dtype)])
            targets = torch.cat([targets, targets.new_ones(fakes.shape[0])])
            means = None if means is None or det_latents[1] is None else torch.cat([means, det_latents[1]])
        if augment is not None:  # (B + F, 3, S, S): one call, labels unseen
            det_images, means = augment(det_images, generator), None  # the latents of the augmented pixels
        if loss_cfg.lambda_att > 0:  # L_MMSA: the detection pass also returns each MMSA layer's q, k, lse
            det = model("det", det_images, return_attention=True, latents=means)
            att = mmsa_consistency(det.attention, core.g_image_tokens, core.d_image_tokens)
        else:
            det = model("det", det_images, latents=means)
        logit = det.logit
        groups.append(BCEGroup("bce", logit, targets, 1.0))
    if groups or student is not None:
        terms = combined_bce_align(groups, student, teacher, w_align, align_scale)
    else:
        terms = LossTerms(images.new_zeros((), dtype=torch.float32))
    if att is not None:
        terms.total = terms.total + loss_cfg.lambda_att * att
        terms.parts["mmsa"] = att.detach()
    if flow is not None:
        terms.total = terms.total + flow
        terms.parts["flow"] = flow.detach()
    terms.parts["total"] = terms.total.detach()
    return terms
