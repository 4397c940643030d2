"""Embedding unigendet in your own training loop: the ops, the model, and a phase step.

    python examples/embed_phase_step.py --steps 20

Nothing here uses unigendet's Trainer: your loop owns the optimizer, the data and the schedule;
unigendet supplies the fused ops, the two-expert model and the loss of a phase step.
"""
import argparse

import torch

import unigendet as ugd
from unigendet.config import LossConfig
from unigendet.train import PHASES, phase_loss, set_trainable


def ops_demo() -> None:
    """The functional ops work on plain tensors: one MMSA call over two streams of different lengths."""
    B, Tg, Td, H, Hkv, D = 2, 37, 50, 4, 2, 32
    q_g, k_g, v_g = torch.randn(B, Tg, H, D), torch.randn(B, Tg, Hkv, D), torch.randn(B, Tg, Hkv, D)
    q_d, k_d, v_d = torch.randn(B, Td, H, D), torch.randn(B, Td, Hkv, D), torch.randn(B, Td, Hkv, D)
    # the published layout: the detector reads the generator's tokens, never the reverse
    o_g, o_d = ugd.ops.mmsa_attention(q_g, k_g, v_g, q_d, k_d, v_d, g2d=False, d2g=True,
                                      len_d=torch.tensor([50, 41]))
    backends = ugd.ops.available_backends()["mmsa_attention"]
    print(f"mmsa_attention: o_g {tuple(o_g.shape)}, o_d {tuple(o_d.shape)}; backends {backends}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    ops_demo()

    torch.manual_seed(0)
    model = ugd.UniGenDet(ugd.ModelConfig(image_size=16, patch_size=4, width=64, depth=2, heads=4, kv_heads=2,
                                          align_layer=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_cfg = LossConfig(lambda_dig=1.0, w_align=0.5, w_auth=0.1)
    noise = torch.Generator().manual_seed(1)

    # your data: here, smooth random "real" images in [-1, 1]
    real = torch.nn.functional.interpolate(torch.rand(32, 3, 4, 4), size=16, mode="bilinear") * 2 - 1
    is_fake = torch.zeros(len(real))
    class_ids = torch.full((len(real),), -1)

    for step in range(args.steps):
        phase = PHASES["gen" if step % 2 == 0 else "det"]  # your schedule
        set_trainable(model, phase)  # the phase decides which experts learn
        fakes = ugd.euler_sample(model, len(real), steps=2, generator=noise) if phase.detects else None
        terms = phase_loss(model, phase, real, is_fake, class_ids, fakes, loss_cfg, noise)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        print(f"step {step:3d} {phase.name}: " + ", ".join(f"{k}={float(v):.4f}" for k, v in terms.parts.items()))

    p_fake = model.p_fake(real[:4])
    print("p_fake of 4 real images:", [round(float(p), 3) for p in p_fake])


if __name__ == "__main__":
    main()
