"""Image-folder datasets: scanning `root/real` + `root/fake`, the PIL dataset, and the sharded loader.

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

Determinism: the augmentation of sample i in epoch e is a pure function of (seed, e, i) and the batch
order of epoch e a function of (seed + e), so batches do not depend on worker count, and a loader
restored from `state_dict()` yields exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import os
import random
import shlex
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .batch import Batch, DataError, collate_samples
from .images import (DEFAULT_MAX_FILE_MB, IMAGE_EXTENSIONS, UnreadableFile, crop_resize, decode_rgb, list_images,
                     max_bytes, open_regular, read_file)
from .quarantine import quarantined_paths, resolve_quarantine


@dataclass
class FolderIndex:
    """The images of a data root, in load order: real images first, then fakes.

    For an image folder `files` are the image paths. For webdataset shards (engine/data/shards.py)
    `files` are names "ROOT/SHARD.tar:MEMBER" (for messages and quarantine lists) and `members`
    says where each image's bytes are: (tar path, byte offset, byte count).
    """

    files: list[str]  # image paths (root joined with the sorted relative path), or shard member names
    is_fake: list[int]  # 1 = generated image from fake/, 0 = real
    class_ids: list[int]  # index into `classes`, -1 when unknown / no classes
    classes: list[str] = field(default_factory=list)  # sorted class names; [] = no classes
    root: str = ""  # the scanned data root, for messages
    quarantine: str = ""  # the quarantine list applied by the scan ("" = none)
    skipped: list[str] = field(default_factory=list)  # listed files present under root, not loaded
    members: list[tuple[str, int, int]] = field(default_factory=list)  # shards only: (tar, offset, size)
    max_bytes: int = DEFAULT_MAX_FILE_MB * 2**20  # data.max_file_mb: larger files / members are not read

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_fake(self) -> int:
        return sum(self.is_fake)

    @property
    def num_real(self) -> int:
        return len(self.files) - self.num_fake

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of image i (one read); `UnreadableFile` (a `DataError`) naming it when it
        cannot be read: an I/O error, not a regular file, more than `max_bytes`."""
        if not self.members:
            return read_file(self.files[i], self.max_bytes)
        tar, offset, size = self.members[i]
        if size > self.max_bytes:
            raise UnreadableFile(self.files[i], "too_large", f"{size} bytes, more than data.max_file_mb = "
                                 f"{self.max_bytes // 2**20} MiB")
        fd = open_regular(tar, self.files[i])
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            raise UnreadableFile(self.files[i], "corrupt", exc.strerror or str(exc)) from exc
        finally:
            os.close(fd)
        if len(data) != size:
            raise UnreadableFile(self.files[i], "corrupt", f"{tar} ends at byte {offset + len(data)}, the index "
                                 f"says {offset + size}")
        return data

    def subset(self, positions: list[int]) -> "FolderIndex":
        """A new index holding the entries at `positions`, in that order."""
        return FolderIndex(
            files=[self.files[p] for p in positions],
            is_fake=[self.is_fake[p] for p in positions],
            class_ids=[self.class_ids[p] for p in positions],
            classes=list(self.classes),
            root=self.root,
            quarantine=self.quarantine,
            skipped=list(self.skipped),
            members=[self.members[p] for p in positions] if self.members else [],
            max_bytes=self.max_bytes,
        )


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
    index = FolderIndex(files=[], is_fake=[], class_ids=[], classes=classes, root=root)

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


def scan_data(root: str | os.PathLike, quarantine: str | os.PathLike | None = "") -> FolderIndex:
    """Index a data root of either layout: an image folder (`scan_folder`) or webdataset shards
    written by `unigendet data pack` (engine/data/shards.py `scan_shards`)."""
    from .shards import is_shards_root, scan_shards

    return scan_shards(root, quarantine) if is_shards_root(root) else scan_folder(root, quarantine)


def command_for(root: str) -> str:
    """The `data check` command line for `root`, quoted for a POSIX shell (used in messages)."""
    return f"unigendet data check {shlex.quote(root)}"


def drop_quarantined(index: FolderIndex, listed: str) -> FolderIndex:
    """`index` without the files named in the quarantine list at `listed` (paths relative to the root)."""
    bad = quarantined_paths(listed)
    # Every path in the index is os.path.join(root, rel): cutting the prefix gives rel exactly and is
    # much cheaper than os.path.relpath on a million files.
    prefix = os.path.join(index.root, "")
    keep, skipped = [], []
    for position, path in enumerate(index.files):
        if path[len(prefix):] in bad:
            skipped.append(path)
        else:
            keep.append(position)
    out = index.subset(keep)
    out.quarantine, out.skipped = listed, skipped
    if out.num_real == 0:
        raise DataError(
            f"{index.root}: all {index.num_real} real images are listed in the quarantine "
            f"list {listed}; nothing left to load"
        )
    return out


class FolderDataset(Dataset):
    """Map-style dataset over a `FolderIndex`: item i -> (image (3, S, S) in [-1, 1], is_fake, class_id).

    train=True: random resized crop (area ~ U[crop_scale_min, 1], aspect log-uniform in [3/4, 4/3]),
    bicubic resize to S x S, random horizontal flip; the randomness of item i is seeded by
    (seed, epoch, i), with the epoch set through `set_epoch`. train=False: shorter side resized to S,
    center crop, no flip. An undecodable file raises `DataError` naming it and the `data check` command:
    files are never skipped here (quarantined files are already left out of the index).
    """

    def __init__(
        self,
        index: FolderIndex,
        image_size: int,
        *,
        seed: int,
        crop_scale_min: float = 0.6,
        flip: bool = True,
        train: bool = True,
    ):
        if image_size < 1:
            raise DataError(f"data.image_size must be >= 1, got {image_size}")
        if not 0.0 < crop_scale_min <= 1.0:
            raise DataError(f"data.crop_scale_min must be in (0, 1], got {crop_scale_min}")
        self.index = index
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.crop_scale_min = float(crop_scale_min)
        self.flip = bool(flip)
        self.train = bool(train)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (call before the epoch's DataLoader starts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, int]:
        """Item i of the epoch set by `set_epoch`, or of the epoch given as key = (epoch, i) (what
        `FolderLoader`'s persistent workers receive, so they need no per-epoch copy of the dataset)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        try:
            img = decode_rgb(self.index.read_bytes(i), self.index.files[i])
        except DataError as exc:
            root = self.index.root or os.path.dirname(self.index.files[i])
            raise DataError(
                f"bad file in dataset folder {root}: {exc}; run `{command_for(root)}` to list every "
                "unreadable file in a quarantine list, which the loaders then skip (they never skip "
                "unlisted files)"
            ) from None
        # String seeds are hashed with SHA-512: stable across processes, runs and Python versions.
        rng = random.Random(f"unigendet/{self.seed}/{epoch}/{i}") if self.train else None
        image = crop_resize(img, self.image_size, rng, crop_scale_min=self.crop_scale_min, flip=self.flip)
        return image, float(self.index.is_fake[i]), int(self.index.class_ids[i])


class FolderLoader:
    """Endless, sharded, resumable iterator of fixed-size `Batch`es over a `FolderIndex`.

    Epoch e: `torch.randperm(N)` seeded with `seed + e`, cut to a multiple of `world_size`; rank r
    takes the strided slice `perm[r::world_size]` (disjoint, equal counts) and splits it into
    `batches_per_epoch` full batches (the remainder is dropped so every step has static shapes).
    Iteration never ends: epochs follow each other and the trainer decides when to stop.
    `state_dict()` counts the batches already yielded, so `load_state_dict` + `iter` continues with
    the very next batch. The loader holds this position: use one iterator at a time, and restore
    state before iterating.
    """

    def __init__(
        self,
        index: FolderIndex,
        image_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        crop_scale_min: float = 0.6,
        flip: bool = True,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ):
        if batch_size < 1 or num_workers < 0 or seed < 0:
            raise DataError(
                f"need batch_size >= 1, num_workers >= 0, seed >= 0: got {batch_size}, {num_workers}, {seed}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.index = index
        self.dataset = FolderDataset(index, image_size, seed=seed, crop_scale_min=crop_scale_min, flip=flip)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_rank = len(index) // self.world_size  # images each rank sees per epoch
        self.batches_per_epoch = self.per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            skipped = f"; {len(index.skipped)} more are quarantined in {index.quarantine}" if index.skipped else ""
            raise DataError(
                f"{index.root}: {len(index)} images ({index.num_real} real, {index.num_fake} fake) is fewer "
                f"than one batch: batch size {batch_size} x world size {world_size} = {batch_size * world_size}"
                f"{skipped}"
            )
        self._epoch = 0
        self._position = 0  # batches already yielded in epoch `_epoch`

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when the dataset has none and every class id is -1)."""
        return len(self.index.classes)

    @property
    def image_size(self) -> int:
        return self.dataset.image_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of dataset indices for `epoch`: `batches_per_epoch` lists of `batch_size`."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.index), generator=generator)  # (N,)
        shard = perm[self.rank : self.per_rank * self.world_size : self.world_size]  # (per_rank,)
        used = self.batches_per_epoch * self.batch_size
        return shard[:used].view(self.batches_per_epoch, self.batch_size).tolist()

    def _plan(self, epoch: int, position: int) -> Iterator[tuple[tuple[int, int], list[tuple[int, int]]]]:
        """((epoch, position) once this batch is consumed, its (epoch, index) keys), forever."""
        while True:
            for k, indices in enumerate(self.epoch_batches(epoch)[position:], start=position + 1):
                after = (epoch, k) if k < self.batches_per_epoch else (epoch + 1, 0)
                yield after, [(epoch, i) for i in indices]
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        # One DataLoader for the whole run: its workers persist across epochs (each item carries its
        # epoch), and the batch sampler is the endless plan, so nothing restarts at an epoch boundary.
        positions = (after for after, _ in self._plan(self._epoch, self._position))
        loader = DataLoader(
            self.dataset,
            batch_sampler=(keys for _, keys in self._plan(self._epoch, self._position)),
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            pin_memory=self.pin_memory,
            # A private generator: DataLoader draws its worker base seed from it, not from the
            # global RNG, so loading never shifts the trainer's random stream.
            generator=torch.Generator().manual_seed(self.seed + self._epoch),
        )
        batch_iter = iter(loader)
        try:
            for batch in batch_iter:
                # counted before the yield: state_dict() includes this batch
                self._epoch, self._position = next(positions)
                yield batch
        except DataError as exc:
            raise DataError(_worker_message(exc)) from None
        finally:
            _stop_workers(batch_iter)

    def state_dict(self) -> dict[str, int]:
        """`{"epoch": e, "position": batches already yielded in epoch e}`."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by `state_dict()` (same data, seed, batch size and world size)."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"loader state: expected {{'epoch': int, 'position': int}}, got {state!r}") from exc
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(
                f"loader state: epoch {epoch}, position {position} does not fit this loader "
                f"({self.batches_per_epoch} batches per epoch); did the data or the batch size change?"
            )
        if position == self.batches_per_epoch:  # saved right after an epoch's last batch
            epoch, position = epoch + 1, 0
        self._epoch, self._position = epoch, position


def _worker_message(exc: DataError) -> str:
    """The original message of a `DataError` raised in a DataLoader worker process.

    DataLoader re-raises a worker's exception as `DataError("Caught DataError in DataLoader worker
    process N.\\nOriginal Traceback ...")`; the user-facing line (the one naming the file, which the
    CLI prints) is the last line of that traceback. Messages from the main process pass unchanged.
    """
    text = str(exc)
    if not text.startswith("Caught DataError in DataLoader worker"):
        return text
    last = text.rstrip().splitlines()[-1]  # "unigendet.data.batch.DataError: bad file in ..."
    return last.split("DataError: ", 1)[1] if "DataError: " in last else text


def _stop_workers(batch_iter) -> None:
    """Shut a DataLoader iterator's worker processes down now, from this thread.

    Left to garbage collection (after an error the traceback keeps the iterator alive), the
    shutdown can run at any time in any thread and race with multiprocessing's queue feeder
    threads ("Exception in thread QueueFeederThread ... Bad file descriptor").
    """
    shutdown = getattr(batch_iter, "_shutdown_workers", None)  # only multi-process iterators have it
    if shutdown is not None:
        shutdown()


def build_loader(
    root: str | os.PathLike,
    image_size: int,
    batch_size: int,
    *,
    seed: int = 0,
    crop_scale_min: float = 0.6,
    flip: bool = True,
    num_workers: int = 2,
    loader: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    quarantine: str | os.PathLike | None = "",
    device: str = "cpu",
    max_file_mb: int | None = None,
) -> FolderLoader:
    """The training loader for `data.root`. `loader` (`data.loader`): "pil" (PIL + DataLoader workers),
    "dali" (engine/data/dali.py: decoding on `device`, nvJPEG on a GPU) or "auto" (DALI on a GPU when
    it is installed, else PIL: on a CPU the PIL workers are the measured default).

    `quarantine` (`data.quarantine`): the list of bad files to skip; "" = ROOT/.unigendet_quarantine.tsv
    when it exists (see `scan_folder`). `max_file_mb` (`data.max_file_mb`, None = the default): larger
    files are unreadable.
    """
    if loader not in ("auto", "pil", "dali"):
        raise DataError(f"data.loader = {loader!r}: expected 'auto', 'pil' or 'dali'")
    kwargs = dict(seed=seed, crop_scale_min=crop_scale_min, flip=flip, num_workers=num_workers, rank=rank,
                  world_size=world_size, pin_memory=pin_memory)
    index = scan_data(root, quarantine)
    index.max_bytes = max_bytes(max_file_mb)
    if loader == "auto":
        from .dali import dali_reason

        loader = "dali" if str(device).startswith("cuda") and dali_reason() is None else "pil"
    if loader == "dali":
        from .dali import DaliLoader

        return DaliLoader(index, image_size, batch_size, device=str(device), **kwargs)
    return FolderLoader(index, image_size, batch_size, **kwargs)


def load_eval_images(
    root: str | os.PathLike,
    image_size: int,
    max_images: int | None = None,
    *,
    num_workers: int = 0,
    quarantine: str | os.PathLike | None = "",
    max_file_mb: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic evaluation set: (images (N, 3, S, S) in [-1, 1], is_fake (N,) float32).

    The first `max_images` real images (sorted order), then, separately, up to `max_images` fakes;
    eval transform (shorter side to S, center crop, no flip). Quarantined files are skipped as in
    `scan_folder` (`quarantine` "" = the default list of `root`, when it exists).
    """
    if max_images is not None and max_images < 1:
        raise DataError(f"max_images must be >= 1 or None, got {max_images}")
    index = scan_data(root, quarantine)
    index.max_bytes = max_bytes(max_file_mb)
    real = [p for p, fake in enumerate(index.is_fake) if not fake][:max_images]
    fake = [p for p, fake in enumerate(index.is_fake) if fake][:max_images]
    dataset = FolderDataset(index.subset(real + fake), image_size, seed=0, train=False)
    loader = DataLoader(
        dataset, batch_size=64, num_workers=num_workers, collate_fn=collate_samples, generator=torch.Generator()
    )
    batch_iter = iter(loader)
    try:
        batches = list(batch_iter)
    except DataError as exc:
        raise DataError(_worker_message(exc)) from None
    finally:
        _stop_workers(batch_iter)
    return torch.cat([b.images for b in batches]), torch.cat([b.is_fake for b in batches])
