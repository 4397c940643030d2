"""Cross-source detection: real and fake images from named sources, scored pair by pair.

A detector that only separates its training photographs from its own generator's images is of little
use; the question is how it does on photographs and generators it never saw. `unigendet eval` takes
any number of named sources,

    --real NAME=DIR        real images: every image under DIR (recursively)
    --real NAME            eval's held-out real images (--data)
    --real-sources DIR     one real source per subfolder of DIR, named after it, and their union,
                           named after DIR (each subfolder contributes up to max_images)
    --fake NAME=DIR        generated images of another model: every image under DIR
    --fake NAME            the checkpoint's own generator (the images eval generates anyway)

and reports, at the operating threshold (label generated when p_fake >= 0.5):
- per real source: the false-positive rate (share of its photographs called generated);
- per fake source: the detection rate (share called generated);
- per (real, fake) pair: AUC, accuracy, F1 and EER of that pair alone.
Without --real the real source is eval's held-out set (`data`); without --fake it is the checkpoint's
own generator (`generated`). Folder images get the evaluation transform that `detect` applies
(shorter side to the model's size, center crop); the first `max_images` files in sorted order are read.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError
from ..data import DataError, load_rgb
from ..inference.detect import eval_tensor
from ..inference.inputs import images_under
from .metrics import detection_metrics

OPERATING_THRESHOLD = 0.5  # p_fake >= this is called generated (detect's default --threshold)
DEFAULT_REAL = "data"  # eval's held-out real images, when no --real is given
DEFAULT_FAKE = "generated"  # the checkpoint's own generator, when no --fake is given
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Source:
    """A named image source; folder None = the checkpoint's own generator (fake sources only)."""

    name: str
    folder: str | None


@dataclass
class CrossSourceSpec:
    """The sources of a cross-source evaluation, as parsed and checked from the command line.

    groups: {name: member real-source names}, one per --real-sources DIR (named after DIR): their
    scores pooled, reported as one more real source."""

    real: list[Source]
    fake: list[Source]
    groups: dict[str, list[str]]


def _check_name(name: str, option: str, given: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"{option} {given!r}: source name {name!r} must start with a letter or digit and "
                          "hold only letters, digits and _ . + -")
    return name


def _check_folder(folder: str, option: str, given: str) -> str:
    if not os.path.isdir(folder):
        raise ConfigError(f"{option} {given!r}: {folder} is not a folder")
    return folder


def _parse(value: str, option: str) -> Source:
    if "=" not in value:
        return Source(_check_name(value, option, value), None)
    name, folder = value.split("=", 1)
    if not folder:
        raise ConfigError(f"{option} {value!r}: empty folder after '='")
    return Source(_check_name(name, option, value), _check_folder(folder, option, value))


def _subfolder_sources(root: str) -> list[Source]:
    """One real source per (non-hidden) subfolder of `root`, sorted by name."""
    if not os.path.isdir(root):
        hint = (" (written by `unigendet data demo` since demo format 3: run it again)"
                if os.path.basename(os.path.normpath(root)) == "heldout_real" else "")
        raise ConfigError(f"--real-sources {root!r}: not a folder{hint}")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ConfigError(f"--real-sources {root!r}: no subfolders (each subfolder is one real source)")
    return [Source(_check_name(n, "--real-sources", root), os.path.join(root, n)) for n in names]


def parse_sources(real: list[str] | None, fake: list[str] | None,
                  real_sources: list[str] | None = None) -> CrossSourceSpec | None:
    """The command line's --real / --real-sources / --fake values -> a spec (None when none is given).

    Checked before any model is loaded: names unique per kind, folders existing, at most one own
    generator."""
    real, fake, real_sources = real or [], fake or [], real_sources or []
    if not (real or fake or real_sources):
        return None
    reals = [_parse(v, "--real") for v in real]
    groups = {}
    for root in real_sources:
        members = _subfolder_sources(root)
        reals.extend(members)
        groups[_check_name(os.path.basename(os.path.normpath(root)), "--real-sources", root)] = [
            m.name for m in members]
    fakes = [_parse(v, "--fake") for v in fake]
    if not reals:
        reals = [Source(DEFAULT_REAL, None)]
    if not fakes:
        fakes = [Source(DEFAULT_FAKE, None)]
    for kind, names in (("real", [s.name for s in reals] + list(groups)), ("fake", [s.name for s in fakes])):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"--{kind}: source name(s) {twice} given more than once")
    if sum(s.folder is None for s in fakes) > 1:
        raise ConfigError("--fake: the checkpoint's own generator (a NAME without =DIR) given more than once")
    if sum(s.folder is None for s in reals) > 1:
        raise ConfigError("--real: eval's held-out real images (a NAME without =DIR) given more than once")
    return CrossSourceSpec(reals, fakes, groups)


def load_folder_images(folder: str, image_size: int, max_images: int,
                       max_file_mb: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first `max_images` images under `folder` (sorted, recursive) -> ((N, 3, S, S) in [-1, 1], paths)."""
    paths, _, unlisted = images_under(folder)
    if unlisted:
        raise DataError(unlisted[0])
    if not paths:
        raise DataError(f"{folder}: no images (looked for image files recursively)")
    paths = paths[:max_images]
    return torch.stack([eval_tensor(load_rgb(p, max_file_mb), image_size) for p in paths]), paths


def cross_source_metrics(real_scores: dict[str, np.ndarray], fake_scores: dict[str, np.ndarray],
                         folders: dict[str, str | None]) -> dict:
    """metrics.json's `cross_source` section from the p_fake scores of each source.

    real_scores / fake_scores: {source name: (N,) p_fake}; folders: {name: folder or None (own
    generator / eval's data)}."""
    t = OPERATING_THRESHOLD
    out = {"threshold": t,
           "real": {n: {"folder": folders.get(n), "n": int(len(s)), "fpr": float(np.mean(s >= t))}
                    for n, s in real_scores.items()},
           "fake": {n: {"folder": folders.get(n), "n": int(len(s)), "detected": float(np.mean(s >= t))}
                    for n, s in fake_scores.items()},
           "pairs": []}
    for rname, r in real_scores.items():
        for fname, f in fake_scores.items():
            scores = np.concatenate([r, f])
            labels = np.concatenate([np.zeros(len(r)), np.ones(len(f))])
            m = detection_metrics(scores, labels, threshold=t)
            out["pairs"].append({"real": rname, "fake": fname, **{k: m[k] for k in ("auc", "acc", "f1", "eer")}})
    return out


def render_cross_source(cs: dict) -> list[str]:
    """report.md lines of the cross-source section."""
    t = cs["threshold"]
    lines = ["## Cross-source detection", "",
             f"Operating threshold: generated when p_fake >= {t:g}.", "",
             "| real source | images | false-positive rate |", "|---|---|---|"]
    for name, d in cs["real"].items():
        lines.append(f"| {name} | {d['n']} | {100 * d['fpr']:.1f}% |")
    lines += ["", "| fake source | images | detected |", "|---|---|---|"]
    for name, d in cs["fake"].items():
        lines.append(f"| {name} | {d['n']} | {100 * d['detected']:.1f}% |")
    lines += ["", "| real | fake | AUC | ACC | F1 | EER |", "|---|---|---|---|---|---|"]
    for p in cs["pairs"]:
        lines.append(f"| {p['real']} | {p['fake']} | {p['auc']:.4f} | {p['acc']:.4f} | {p['f1']:.4f} | "
                     f"{p['eer']:.4f} |")
    return lines + [""]
