"""Image-folder data roots: scanning `root/real` + `root/fake` into a `FolderIndex`, reading the files.

Layout of a data root (docs/design.md §8, `data.root`):

    root/real/...            real photographs (label 0), required
    root/fake/...            external generated images (label 1), optional

Classes: when `real/` has subfolders holding images, each subfolder name is a class (sorted, ids
0..K-1) and every real image must sit in one. `fake/` subfolders must then be class names too; fakes
directly under `fake/` get class -1 (unknown). Without classes every class id is -1 and subfolders
of `fake/` (e.g. one per generator) only organise files. Files are found recursively by extension,
hidden files and folders (".name") are ignored, and everything is sorted so scans are deterministic.

Bad files: files listed in the quarantine list (engine/data/quarantine.py; written by `unigendet data
check ROOT`, by default ROOT/.unigendet_quarantine.tsv) are dropped from the scan; classes are decided
before that, so class ids do not change when a list is added. A bad file that is not listed stops the
loaders with a `DataError` naming it and the `data check` command (they never skip on their own).
"""
from __future__ import annotations

import os

from ..batch import DataError
from ..images import IMAGE_EXTENSIONS, list_images, read_file
from ..index import FolderIndex
from ..quarantine import drop_quarantined, resolve_quarantine


def read_folder_file(index: FolderIndex, i: int) -> bytes:
    """The `FolderIndex.reader` of an image folder: sample i is the file `index.files[i]`."""
    return read_file(index.files[i], index.max_bytes)


def _split_top(rel_paths: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split relative paths into (files directly in the folder, {subfolder: files below it})."""
    top, by_sub = [], {}
    for rel in rel_paths:
        head, sep, _ = rel.partition(os.sep)
        if sep:
            by_sub.setdefault(head, []).append(rel)
        else:
            top.append(rel)
    return top, by_sub


def scan_folder(root: str | os.PathLike, quarantine: str | os.PathLike | None = "") -> FolderIndex:
    """Index the images of a data root (layout and class rules in the module docstring).

    `quarantine` (`data.quarantine`): "" -> skip the files listed in ROOT/.unigendet_quarantine.tsv
    when it exists; a path -> the files listed there (it must exist); None -> list every image
    (what `data check` reads).
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root}: data root not found (expected a folder holding real/ and optionally fake/)")
    real_dir = os.path.join(root, "real")
    if not os.path.isdir(real_dir):
        raise DataError(f"{real_dir}: folder missing; the data root must hold real/ (and optionally fake/)")

    real_top, real_sub = _split_top(list_images(real_dir))
    if not real_top and not real_sub:
        exts = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise DataError(f"{real_dir}: no images found (searched recursively for {exts})")
    if real_sub and real_top:
        raise DataError(
            f"{real_dir}: holds class subfolders ({', '.join(sorted(real_sub))}) and also images directly "
            f"inside (e.g. {real_top[0]}); put every real image in a class subfolder, or use no subfolders"
        )
    classes = sorted(real_sub)
    class_of = {name: k for k, name in enumerate(classes)}
    index = FolderIndex(files=[], is_fake=[], class_ids=[], reader=read_folder_file, classes=classes, root=root)

    def add(folder: str, rel_paths: list[str], label: int, class_id: int) -> None:
        index.files.extend(os.path.join(folder, rel) for rel in rel_paths)
        index.is_fake.extend([label] * len(rel_paths))
        index.class_ids.extend([class_id] * len(rel_paths))

    add(real_dir, real_top, 0, -1)
    for name in classes:
        add(real_dir, real_sub[name], 0, class_of[name])

    fake_dir = os.path.join(root, "fake")
    if os.path.isdir(fake_dir):
        fake_rel = list_images(fake_dir)
        if classes:
            fake_top, fake_sub = _split_top(fake_rel)
            unknown = sorted(set(fake_sub) - set(classes))
            if unknown:
                raise DataError(
                    f"{os.path.join(fake_dir, unknown[0])}: fake/ subfolders must be class names from "
                    f"real/ ({', '.join(classes)}); unknown: {', '.join(unknown)}"
                )
            add(fake_dir, fake_top, 1, -1)
            for name in sorted(fake_sub):
                add(fake_dir, fake_sub[name], 1, class_of[name])
        else:
            add(fake_dir, fake_rel, 1, -1)
    listed = resolve_quarantine(root, quarantine)
    return drop_quarantined(index, listed) if listed else index
