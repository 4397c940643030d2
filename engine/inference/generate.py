"""`unigendet generate`: images from a checkpoint's generator, as one grid image or as a folder of
PNG files with a manifest, optionally behind an authenticity gate.

Folder output (`--out-dir DIR`, or `--out DIR` without an extension): DIR/00000000.png, ... written
batch by batch (memory: one batch), and DIR/manifest.jsonl, one JSON object per written image:

    {"file": "00000000.png", "index": 0, "seed": 0, "candidate": 0, "batch_size": 50,
     "step": 2000, "checkpoint": "runs/demo/checkpoints/step_0002000", "weights": "ema",
     "cfg_scale": 1.0, "sampler_steps": 16, "timestep_shift": 1.0, "p_fake": 0.0731}

(plus "class_id" for a class-conditional model). `p_fake` is the model's own detector on the image
as saved (8-bit pixels), so `unigendet detect` on the file reports the same value.

Authenticity gate (`max_p_fake` X): only images the detector scores below X are written; rejected
candidates are replaced by new ones until n images are kept or `max_tries` candidates were scored.
`candidate` numbers every scored image of the run (kept or not), so acceptance = kept / tried.

Determinism: the noise (and the class labels) of every candidate come from one generator seeded
with `seed` and drawn batch by batch, so the same checkpoint, seed, batch size, sampler settings
and device give the same files and manifest.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from ..config import ConfigError
from ..grid import to_uint8
from ..model import euler_sample

GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_GRID_IMAGES = 1024  # one grid image holds at most this many samples (a 32 x 32 mosaic)
MANIFEST_NAME = "manifest.jsonl"
DEFAULT_TRIES_PER_IMAGE = 10  # --max-tries default: this many candidates per requested image


@dataclass
class SamplerSettings:
    """How candidates are drawn: Euler steps, timestep shift, guidance scale, batch size, seed."""

    steps: int
    shift: float
    cfg_scale: float
    batch_size: int
    seed: int


@dataclass
class FolderResult:
    """What a folder run did: images kept of those requested, candidates scored, the gate."""

    out_dir: str
    manifest: str
    requested: int
    kept: int
    tried: int  # candidates scored (kept or rejected)
    max_p_fake: float | None
    max_tries: int | None

    @property
    def acceptance_rate(self) -> float:
        return self.kept / self.tried if self.tried else 0.0

    @property
    def complete(self) -> bool:
        return self.kept == self.requested

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}

    def gate_line(self) -> str:
        """The acceptance report of a gated run (one line)."""
        text = (f"authenticity gate p_fake < {self.max_p_fake:g}: kept {self.kept} of {self.tried} candidates "
                f"({100 * self.acceptance_rate:.1f}% accepted)")
        if not self.complete:
            text += (f"; stopped at --max-tries {self.max_tries} with {self.kept} of the {self.requested} images "
                     "requested (raise --max-tries or --max-p-fake)")
        return text


# ----------------------------------------------------------------------------- checks


def check_out(out: str, n: int, *, option: str = "--out", folder: bool | None = None) -> bool:
    """Check --n and the output path before generating; True for a grid image, False for a folder.

    folder=None: a path without an extension (or an existing folder, or one ending in a separator)
    is a folder, anything else a grid image. A folder is created and must be empty; the folder of a
    grid image must be writable."""
    if n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    suffix = os.path.splitext(out)[1].lower()
    grid = not (out.endswith(os.sep) or os.path.isdir(out) or suffix == "") if folder is None else not folder
    if grid and suffix not in GRID_EXTENSIONS:
        raise ConfigError(f"{option} {out}: unknown extension {suffix!r}; give a grid image "
                          f"({', '.join(GRID_EXTENSIONS)}) or a folder (no extension) for one PNG per image")
    if grid and n > MAX_GRID_IMAGES:
        raise ConfigError(f"--n {n}: a grid image holds at most {MAX_GRID_IMAGES}; give --out-dir a folder to "
                          "write one PNG per image, in batches")
    target = os.path.dirname(os.path.abspath(out)) if grid else os.path.abspath(out)
    above = target
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ConfigError(f"{option} {out}: {above} is a file, not a folder")
    if grid and os.path.isdir(out):
        raise ConfigError(f"{option} {out}: is a folder; give a file name such as {os.path.join(out, 'grid.png')}")
    try:
        os.makedirs(target, exist_ok=True)
        if not grid and os.listdir(target):
            raise ConfigError(f"{option} {out}: folder is not empty; give a new or empty folder")
        fd, probe = tempfile.mkstemp(dir=target, prefix=".unigendet-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{option} {out}: cannot write in {target} ({e.strerror or e})") from None
    return grid


def check_gate(n: int, max_p_fake: float | None, max_tries: int | None) -> int | None:
    """Check --max-p-fake / --max-tries; returns the candidate limit (None without the gate)."""

    if max_p_fake is None:
        if max_tries is not None:
            raise ConfigError("--max-tries limits the authenticity gate; give --max-p-fake too")
        return None
    if not (math.isfinite(max_p_fake) and 0 < max_p_fake <= 1):
        raise ConfigError(f"--max-p-fake must be in (0, 1], got {max_p_fake}")
    limit = DEFAULT_TRIES_PER_IMAGE * n if max_tries is None else max_tries
    if limit < n:
        raise ConfigError(f"--max-tries must be >= --n ({n}), got {limit}")
    return limit


def checkpoint_step(step_dir: Path, weights: str) -> int | None:
    """The training step stored in the metadata of the step folder's `weights` file (None if absent)."""

    with safe_open(str(Path(step_dir) / f"{weights}.safetensors"), "pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None and str(step).isdigit() else None


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_batch(model, m: int, settings: SamplerSettings, generator: torch.Generator, device):
    """m candidates: ((m, H, W, 3) uint8 pixels as saved, (m,) p_fake of those pixels, (m,) class ids or None)."""

    ids = None
    if model.cfg.num_classes > 0:
        ids = torch.randint(0, model.cfg.num_classes, (m,), generator=generator, device=device)
    images = euler_sample(model, m, steps=settings.steps, generator=generator, class_ids=ids,
                          cfg_scale=settings.cfg_scale, batch_size=m, device=device, shift=settings.shift)
    pixels = to_uint8(images)  # (m, H, W, 3) uint8: what the PNG files hold
    saved = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (m, 3, H, W)
    p_fake = model.p_fake(saved).double().cpu()  # (m,): the detector on the saved image, as detect sees it
    return pixels, p_fake, None if ids is None else ids.cpu()


def generate_to_folder(model, out_dir: str | Path, n: int, settings: SamplerSettings, *, device,
                       provenance: dict, max_p_fake: float | None = None, max_tries: int | None = None,
                       progress: Callable[[int], None] | None = None) -> FolderResult:
    """Write n images (fewer if the gate's `max_tries` runs out) as PNGs + manifest.jsonl into `out_dir`
    (already checked by `check_out`). `provenance`: fields every manifest line carries (step,
    checkpoint, weights). `progress(k)` is called with the images each batch kept."""

    out_dir = Path(out_dir)
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed)
    common = {"seed": settings.seed, "batch_size": settings.batch_size, **provenance, "cfg_scale": settings.cfg_scale,
              "sampler_steps": settings.steps, "timestep_shift": settings.shift}
    kept = tried = 0
    manifest = out_dir / MANIFEST_NAME
    with open(manifest, "w", encoding="utf-8") as lines:
        while kept < n and (max_tries is None or tried < max_tries):
            left = n - kept if max_tries is None else max_tries - tried
            m = min(settings.batch_size, left)
            pixels, p_fake, ids = sample_batch(model, m, settings, generator, device)
            before = kept
            for j in range(m):
                if kept == n:  # the rest of a gated batch is not needed (and not counted as tried)
                    break
                candidate, tried = tried, tried + 1
                if max_p_fake is not None and not p_fake[j] < max_p_fake:
                    continue
                name = f"{kept:08d}.png"
                Image.fromarray(pixels[j]).save(out_dir / name)
                record = {"file": name, "index": kept, "candidate": candidate, **common,
                          **({"class_id": int(ids[j])} if ids is not None else {}), "p_fake": float(p_fake[j])}
                lines.write(json.dumps(record) + "\n")
                kept += 1
            lines.flush()  # the manifest describes the files on disk as they are written
            if progress is not None:
                progress(kept - before)
    return FolderResult(str(out_dir), str(manifest), n, kept, tried, max_p_fake, max_tries)


def read_manifest(out_dir: str | Path) -> list[dict]:
    """The records of OUT_DIR/manifest.jsonl, in file order."""
    path = Path(out_dir) / MANIFEST_NAME
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
