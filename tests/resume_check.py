"""The exact-resume check shared by the trainer, latent and augmentation tests: a run killed after a
checkpoint and resumed must end with the weights of a run that never stopped."""
from __future__ import annotations

import torch

from unigendet.train import Trainer


def resume_after_kill(cfg, kill_at: int) -> Trainer:
    """Train `cfg` to step `kill_at`, save, drop the trainer (the process "dies"), resume from that
    checkpoint in a new trainer and train to the end; return the resumed trainer."""
    b = Trainer(cfg, log=lambda *_: None)
    while b.step_idx < kill_at:
        b.step()
    b.save()
    del b
    c = Trainer(cfg, resume=True, log=lambda *_: None)
    assert c.step_idx == kill_at
    c.train()
    return c


def assert_same_weights(a: Trainer, c: Trainer) -> None:
    """Model and EMA parameters bit-identical."""
    for (n, p), q in zip(a.model.named_parameters(), c.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    for p, q in zip(a.ema.model.parameters(), c.ema.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
