"""The PIL loader: `FolderDataset` (decode + crop one sample) and `FolderLoader` (endless, sharded,
resumable batches through DataLoader workers) over a `FolderIndex` of any source.

Determinism: the augmentation of sample i in epoch e is a pure function of (seed, e, i) and the batch
order of epoch e a function of (seed + e), so batches do not depend on worker count, and a loader
restored from `state_dict()` yields exactly the batches an uninterrupted one would have.
"""
from __future__ import annotations

import os
import random
from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..batch import Batch, DataError, collate_samples
from ..images import CROP_MODES, crop_plan, decode_rgb, resize_box
from ..index import FolderIndex
from ..latents import LATENT_EXT, check_latents_match, moments_from_bytes
from ..quarantine import check_command


class FolderDataset(Dataset):
    """Map-style dataset over a `FolderIndex`: item i -> (image (3, S, S) in [-1, 1], is_fake, class_id),
    with latents=True also the sample's precomputed moments (2C, h, w) float32.

    train=True: crop="random_resized": random resized crop (area ~ U[crop_scale_min, 1], aspect
    log-uniform in [3/4, 4/3]), crop="center": the center square; bicubic resize to S x S, random
    horizontal flip (of the moments too); the randomness of item i is seeded by (seed, epoch, i),
    with the epoch set through `set_epoch`. train=False: shorter side resized to S, center crop, no
    flip. An undecodable file raises `DataError` naming it and the `data check` command: files are
    never skipped here (quarantined files are already left out of the index).

    cache_bytes: decoded images kept in memory (per process: each DataLoader worker holds its own),
    first come first kept until the budget is used; a kept image is never read or decoded again, and
    gives the same crops as a fresh decode (the transforms never modify it).
    """

    def __init__(
        self,
        index: FolderIndex,
        image_size: int,
        *,
        seed: int,
        crop: str = "random_resized",
        crop_scale_min: float = 0.6,
        flip: bool = True,
        train: bool = True,
        latents: bool = False,
        cache_bytes: int = 0,
    ):
        if image_size < 1:
            raise DataError(f"data.image_size must be >= 1, got {image_size}")
        if not 0.0 < crop_scale_min <= 1.0:
            raise DataError(f"data.crop_scale_min must be in (0, 1], got {crop_scale_min}")
        if crop not in CROP_MODES:
            raise DataError(f"data.crop = {crop!r}: expected one of {', '.join(map(repr, CROP_MODES))}")
        if latents and index.latents is None:
            raise DataError(f"{index.root}: holds no precomputed latents (pack it with `unigendet data pack --vae`)")
        self.index = index
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.crop = crop
        self.crop_scale_min = float(crop_scale_min)
        self.flip = bool(flip)
        self.train = bool(train)
        self.latents = bool(latents)
        self.epoch = 0
        self.cache_bytes = int(cache_bytes)
        self._decoded: dict[int, Image.Image] = {}  # item index -> decoded RGB image
        self._decoded_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of `epoch` (call before the epoch's DataLoader starts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        """Item i of the epoch set by `set_epoch`, or of the epoch given as key = (epoch, i) (what
        `FolderLoader`'s persistent workers receive, so they need no per-epoch copy of the dataset)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        img = self._decoded.get(i)
        if img is None:
            img = self._decode(i)
        # String seeds are hashed with SHA-512: stable across processes, runs and Python versions.
        rng = random.Random(f"unigendet/{self.seed}/{epoch}/{i}") if self.train else None
        box, flip = crop_plan(img.width, img.height, rng, crop=self.crop, crop_scale_min=self.crop_scale_min,
                              flip=self.flip)
        image = resize_box(img, self.image_size, box, flip)
        item = (image, float(self.index.is_fake[i]), int(self.index.class_ids[i]))
        if not self.latents:
            return item
        moments = read_moments(self.index, i)  # (2C, h, w): the moments of the same (center) crop
        return item + (moments.flip(-1) if flip else moments,)  # mirrored with the pixels

    def _decode(self, i: int) -> Image.Image:
        """Image i read and decoded (kept in memory while the cache budget allows)."""
        try:
            img = decode_rgb(self.index.read_bytes(i), self.index.files[i])
        except DataError as exc:
            root = self.index.root or os.path.dirname(self.index.files[i])
            raise DataError(
                f"bad file in dataset folder {root}: {exc}; run `{check_command(root)}` to list every "
                "unreadable file in a quarantine list, which the loaders then skip (they never skip "
                "unlisted files)"
            ) from None
        size = img.width * img.height * 3
        if self._decoded_bytes + size <= self.cache_bytes:
            self._decoded[i] = img
            self._decoded_bytes += size
        return img


def read_moments(index: FolderIndex, i: int) -> torch.Tensor:
    """Sample i's precomputed moments (2C, h, w) float32, checked against the pack's shape."""
    name = f"{os.path.splitext(index.files[i])[0]}.{LATENT_EXT}"
    return moments_from_bytes(index.read_latent_bytes(i), name, index.latents["shape"])


class FolderLoader:
    """Endless, sharded, resumable iterator of fixed-size `Batch`es over a `FolderIndex`.

    Epoch e: `torch.randperm(N)` seeded with `seed + e`, cut to a multiple of `world_size`; rank r
    takes the strided slice `perm[r::world_size]` (disjoint, equal counts) and splits it into
    `batches_per_epoch` full batches (the remainder is dropped so every step has static shapes).
    Iteration never ends: epochs follow each other and the trainer decides when to stop.
    `state_dict()` counts the batches already yielded, so `load_state_dict` + `iter` continues with
    the very next batch. The loader holds this position: use one iterator at a time, and restore
    state before iterating.

    `vae_fingerprint` (the run's `model.vae`, None = pixel space): with shards packed by `data pack --vae`
    the batches carry `latent_moments` (`self.latents` is True), after checking that the pack's VAE,
    image size and crop are the run's (engine/data/latents.py); without, they carry none.
    """

    def __init__(
        self,
        index: FolderIndex,
        image_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        crop: str = "random_resized",
        crop_scale_min: float = 0.6,
        flip: bool = True,
        num_workers: int = 2,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        vae_fingerprint: str | None = None,
        cache_mb: int = 0,
    ):
        if batch_size < 1 or num_workers < 0 or seed < 0:
            raise DataError(
                f"need batch_size >= 1, num_workers >= 0, seed >= 0: got {batch_size}, {num_workers}, {seed}"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.index = index
        # Batches carry the precomputed moments when the run has a VAE and the shards hold its latents
        # (checked: same VAE, image size and crop); otherwise the trainer encodes the pixels itself.
        self.latents = vae_fingerprint is not None and index.latents is not None
        if self.latents:
            check_latents_match(index.latents, index.root, vae_fingerprint, int(image_size), crop)
        self.dataset = FolderDataset(index, image_size, seed=seed, crop=crop, crop_scale_min=crop_scale_min,
                                     flip=flip, latents=self.latents, cache_bytes=int(cache_mb) * 2**20)
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
            raise DataError(worker_message(exc)) from None
        finally:
            stop_workers(batch_iter)

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


def worker_message(exc: DataError) -> str:
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


def stop_workers(batch_iter) -> None:
    """Shut a DataLoader iterator's worker processes down now, from this thread.

    Left to garbage collection (after an error the traceback keeps the iterator alive), the
    shutdown can run at any time in any thread and race with multiprocessing's queue feeder
    threads ("Exception in thread QueueFeederThread ... Bad file descriptor").
    """
    shutdown = getattr(batch_iter, "_shutdown_workers", None)  # only multi-process iterators have it
    if shutdown is not None:
        shutdown()
