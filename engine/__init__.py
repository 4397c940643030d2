"""unigendet: a fused-kernel training engine for co-evolutionary image generation and detection.

    import unigendet as ugd
    model = ugd.UniGenDet(ugd.ModelConfig(...))
    trainer = ugd.Trainer(ugd.load_config("tiny_cpu"))
"""
from . import ops
from .config import Config, ConfigError, ModelConfig, load_config
from .model import UniGenDet, euler_sample

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it (a literal, not imported)


def __getattr__(name):
    # the trainer pulls in data loading; import it on first use so `import unigendet` stays light
    if name == "Trainer":
        from .train import Trainer

        return Trainer
    raise AttributeError(f"module 'unigendet' has no attribute {name!r}")


__all__ = ["ops", "Config", "ConfigError", "ModelConfig", "load_config", "UniGenDet", "Trainer",
           "euler_sample", "__version__"]
