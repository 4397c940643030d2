"""`FolderIndex`: the samples of a data root in load order, with their labels and classes.

The index does not know which source built it (an image folder, webdataset shards): each source
(engine/data/sources/) fills `files` and the labels, keeps in `locations` whatever it needs to find
a sample's bytes, and sets `reader`, a module-level function (so DataLoader workers can pickle it)
that reads them. Everything above the sources (quarantine filtering, the check, the loaders) sees
only this type.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .batch import DataError
from .images import DEFAULT_MAX_FILE_MB

# reader(index, i) -> the encoded bytes of sample i; `UnreadableFile` (a `DataError`) naming it when
# they cannot be read: an I/O error, not a regular file, more than `index.max_bytes`.
SampleReader = Callable[["FolderIndex", int], bytes]


@dataclass
class FolderIndex:
    """The images of a data root, in load order: real images first, then fakes (as the source lists them)."""

    files: list[str]  # one name per sample: the image path, or "ROOT/SHARD.tar:MEMBER" (messages, quarantine)
    is_fake: list[int]  # 1 = generated image from fake/, 0 = real
    class_ids: list[int]  # index into `classes`, -1 when unknown / no classes
    reader: SampleReader  # how this source reads a sample's bytes
    classes: list[str] = field(default_factory=list)  # sorted class names; [] = no classes
    root: str = ""  # the scanned data root, for messages
    quarantine: str = ""  # the quarantine list applied by the scan ("" = none)
    skipped: list[str] = field(default_factory=list)  # listed files present under root, not loaded
    locations: list[Any] = field(default_factory=list)  # per sample, for `reader`; [] when `files` say it all
    max_bytes: int = DEFAULT_MAX_FILE_MB * 2**20  # data.max_file_mb: larger samples are not read
    # Precomputed latents (shards from `data pack --vae`, engine/data/latents.py): the pack's latent
    # metadata (None = none), per sample where its moments member lies, and the reader of its bytes.
    latents: dict | None = None
    latent_locations: list[Any] = field(default_factory=list)
    latent_reader: SampleReader | None = None

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
        return self.reader(self, i)

    def read_latent_bytes(self, i: int) -> bytes:
        """The bytes of sample i's precomputed moments member (only when `latents` is set)."""
        if self.latent_reader is None:
            raise DataError(f"{self.root}: holds no precomputed latents (pack it with `unigendet data pack --vae`)")
        return self.latent_reader(self, i)

    def subset(self, positions: list[int]) -> FolderIndex:
        """A new index holding the entries at `positions`, in that order."""
        return FolderIndex(
            files=[self.files[p] for p in positions],
            is_fake=[self.is_fake[p] for p in positions],
            class_ids=[self.class_ids[p] for p in positions],
            reader=self.reader,
            classes=list(self.classes),
            root=self.root,
            quarantine=self.quarantine,
            skipped=list(self.skipped),
            locations=[self.locations[p] for p in positions] if self.locations else [],
            max_bytes=self.max_bytes,
            latents=self.latents,
            latent_locations=[self.latent_locations[p] for p in positions] if self.latent_locations else [],
            latent_reader=self.latent_reader,
        )
