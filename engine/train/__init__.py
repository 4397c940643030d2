"""Training: phases, fake pool, optimizer / EMA, checkpoints, the trainer loop."""
from ..phase_modes import PHASES, Phase, phase_at
from .checkpoint import (CheckpointError, checkpoint_config, list_checkpoints, load_trainer_state, load_weights,
                         resolve_checkpoint, save_checkpoint)
from .fake_pool import FakePool
from .optim import EMA, build_optimizer, lr_multiplier
from .phases import phase_loss, set_trainable
from .trainer import Trainer, TrainingError, resolve_device

__all__ = ["Trainer", "TrainingError", "resolve_device", "Phase", "PHASES", "phase_at", "phase_loss", "set_trainable",
           "FakePool", "EMA", "build_optimizer", "lr_multiplier", "CheckpointError", "checkpoint_config",
           "list_checkpoints", "load_trainer_state", "load_weights", "resolve_checkpoint", "save_checkpoint"]
