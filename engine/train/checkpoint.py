"""Checkpoints that lose nothing and load nothing executable.

Layout (docs/design.md §8): `run/checkpoints/step_NNNNNNN/` with
- `model.safetensors`, `ema.safetensors`: weights (metadata: format version, step);
- `trainer_state.pt`: optimizer, scheduler, RNG, data position, fake pool — tensors and plain
  Python values only, read back with `torch.load(weights_only=True)`;
- `config.toml`: the resolved config, so a step folder is self-contained for generate / detect / eval.
A latent model's weights files also record its VAE in their metadata (`vae_path`, `vae_sha256`, see
`check_vae`): resume and eval refuse another VAE.
A checkpoint is written into a temporary folder, fsynced, then renamed into place: a folder named
`step_*` is always complete. Only folders holding nothing but those files are ever deleted (old
checkpoints, temporary folders and partial step folders of a killed run); a folder that also holds
anything else is left as it is. Weights are checked on load: the model's names and shapes, a
floating-point dtype, finite values (`CheckpointError` naming the file and tensor otherwise).
"""
from __future__ import annotations

import os
import pickle
import re
import secrets
import warnings
from pathlib import Path
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config, ConfigError, dumps, load_config
from .fsdp import shard_like

FORMAT_VERSION = "1"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
# the temporary folder a save writes into: .tmp_step_STEP_PID_TOKEN (older versions: without _TOKEN)
TMP_DIR = re.compile(r"^\.tmp_step_\d{7,}_\d+(_[0-9a-f]+)?$")
FILES = ("model.safetensors", "ema.safetensors", "trainer_state.pt", "config.toml")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or from another version; the message names the file."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Weights = nn.Module | Mapping[str, torch.Tensor]


def _state_dict(weights: Weights) -> dict[str, torch.Tensor]:
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: str | Path, step: int, model: Weights, ema_model: Weights, trainer_state: dict,
                    cfg: Config, keep_last: int = 3, vae: dict[str, str] | None = None) -> Path:
    """Write run_dir/checkpoints/step_{step:07d} atomically; keep the newest `keep_last`.

    model / ema_model: the modules, or their full state dicts (gathered from FSDP shards); vae: the
    latent model's VAE as {"vae_path": ..., "vae_sha256": ...} (`vae_record`), kept in the metadata."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    remove_stale(run_dir)  # temporary folders of a run killed while saving: never a checkpoint
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}_{secrets.token_hex(4)}"
    tmp.mkdir()
    meta = {"format_version": FORMAT_VERSION, "step": str(step), **(vae or {})}
    save_file(_state_dict(model), tmp / "model.safetensors", metadata=meta)
    save_file(_state_dict(ema_model), tmp / "ema.safetensors", metadata=meta)
    torch.save({"format_version": FORMAT_VERSION, "step": step, **trainer_state}, tmp / "trainer_state.pt")
    (tmp / "config.toml").write_text(dumps(cfg))
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists() and not remove_ours(final):  # re-saving a step (final save right after a periodic one)
        remove_ours(tmp)
        raise CheckpointError(f"{final}: exists and holds files unigendet did not write; not replacing it "
                              "(move them away)")
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        remove_ours(old)  # a step folder holding someone else's files too is left as it is
    return final


def remove_ours(folder: Path) -> bool:
    """Delete a checkpoint folder (step_* or its temporary folder) when it holds only files a save
    writes (`FILES`); True when it is gone. Anything else inside (a user's file, a subfolder) keeps the
    folder and everything in it."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if any(e.name not in FILES or e.is_symlink() or not e.is_file() for e in entries):
        return False
    for e in entries:
        e.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # a file appeared meanwhile: keep it
        return False
    return True


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Remove what a killed run left under run_dir/checkpoints: its temporary folders and step
    folders missing a file (a kill while an old checkpoint was being deleted), each only when it
    holds nothing but checkpoint files (`remove_ours`). Returns the folders left because they hold
    other files."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    kept = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        partial = STEP_DIR.match(p.name) and not all((p / f).is_file() for f in FILES)
        if (TMP_DIR.match(p.name) or partial) and not remove_ours(p):
            kept.append(p)
    return kept


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and STEP_DIR.match(p.name) and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder as given, or the newest complete checkpoint of a run folder."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        raise CheckpointError(f"{p}: expected a checkpoint folder (step_NNNNNNN/) or a run folder, got a file")
    if STEP_DIR.match(p.name):
        missing = [f for f in FILES if not (p / f).is_file()]
        if missing:
            raise CheckpointError(f"{p}: incomplete checkpoint, missing {', '.join(missing)}")
        return p
    ckpts = list_checkpoints(p)
    if not ckpts:
        raise CheckpointError(f"{p}: no complete checkpoint "
                              f"(expected {p}/checkpoints/step_NNNNNNN/ with {', '.join(FILES)})")
    return ckpts[-1]


def load_weights(ckpt: Path, model: nn.Module, which: str = "ema") -> int:
    """Load `which` (ema | model) weights of a step folder into `model` (its shards, if FSDP shards
    it); returns the step."""
    path = Path(ckpt) / f"{which}.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta.get('format_version')!r}, this unigendet "
                              f"reads version {FORMAT_VERSION!r}")
    check_tensors(path, tensors, model.state_dict())
    result = model.load_state_dict(shard_like(tensors, model), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}); was it trained with another model config?")
    return int(meta.get("step", 0))


def check_tensors(path: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit the model exactly: every name present and no other, the
    model's shapes, a floating-point dtype wherever the model has one (a float dtype of another
    width is cast on load; integers never are), finite values. One line naming the file and tensor."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); was it trained with another model config?")
    for name, want in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, the model config needs "
                                  f"{tuple(want.shape)}; was it trained with another model config?")
        if want.is_floating_point() != t.is_floating_point() or (not t.is_floating_point() and t.dtype != want.dtype):
            raise CheckpointError(f"{path}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}, expected "
                                  f"{str(want.dtype).replace('torch.', '')}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name} holds {bad} non-finite value(s) (NaN or inf)")


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt of a step folder, read with weights_only=True (no code runs from the file)."""
    path = Path(ckpt) / "trainer_state.pt"
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4" of a foreign file: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's multi-line message would suggest the unsafe weights_only=False
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors and plain values "
                              "(loading them could run code); not a trainer state unigendet wrote") from None
    except Exception as e:  # any other unpickling / zip error: the file is not ours or is damaged
        first = (str(e).strip().splitlines() or [""])[0]
        detail = f"{type(e).__name__}: {first}" if "weights_only" not in first else type(e).__name__
        raise CheckpointError(f"{path}: cannot read trainer state ({detail})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: trainer state format {found!r}, this unigendet reads {FORMAT_VERSION!r}")
    return state


def checkpoint_config(ckpt: Path) -> Config:
    """The resolved config saved with a checkpoint."""
    path = Path(ckpt) / "config.toml"
    try:
        return load_config(path)
    except ConfigError as e:  # its message names the file already when the file itself is at fault
        raise CheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def vae_record(path: str | Path) -> dict[str, str]:
    """What a checkpoint records of a latent model's VAE: its folder and `vae_fingerprint`."""
    from ..vae import vae_fingerprint

    return {"vae_path": str(path), "vae_sha256": vae_fingerprint(path)}


def checkpoint_vae(ckpt: Path) -> dict[str, str]:
    """The VAE recorded in a step folder's weights metadata ({} for a pixel-space checkpoint)."""
    from safetensors import safe_open

    path = Path(ckpt) / "model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: meta[k] for k in ("vae_path", "vae_sha256") if k in meta}


def check_vae(ckpt: Path, current: dict[str, str]) -> None:
    """Refuse to go on with another VAE than the one the checkpoint's generator was trained with
    (`current`: `vae_record` of the VAE about to be used)."""
    recorded = checkpoint_vae(ckpt)
    if not recorded:
        raise CheckpointError(f"{ckpt}: records no VAE (a pixel-space checkpoint, or one written before VAEs were "
                              f"recorded), but model.vae = {current['vae_path']}")
    if recorded["vae_sha256"] != current["vae_sha256"]:
        raise CheckpointError(f"{ckpt}: trained with the VAE {recorded['vae_path']} (sha256 "
                              f"{recorded['vae_sha256'][:16]}...), but the VAE now is {current['vae_path']} (sha256 "
                              f"{current['vae_sha256'][:16]}...); use the same VAE weights")


def checkpoint_vae_loader(ckpt: Path, vae_path: str, device):
    """A zero-argument function that loads the latent model's VAE from `vae_path` (the checkpoint's
    model.vae) onto `device`, after checking it is the one the checkpoint records (`check_vae`); for
    `UniGenDet.attach_vae`, so that only what generates or encodes loads it (detection does only with
    model.d2g)."""
    def load():
        from ..vae import load_vae

        check_vae(ckpt, vae_record(vae_path))
        return load_vae(vae_path, device)

    return load
