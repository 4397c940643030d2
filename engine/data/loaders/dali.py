"""The NVIDIA DALI loader: the `FolderLoader` contract (same batches, shards, epochs, resumable
position, `Batch` out) with decoding, resizing, flipping and normalising done by a DALI pipeline.

Python keeps what must match the PIL loader exactly: which files form each batch (the epoch
permutation and rank shard of `FolderLoader.epoch_batches`) and each sample's crop box and flip,
drawn with the same per-sample `random.Random(f"unigendet/{seed}/{epoch}/{index}")` stream from the
image size in the file header. DALI receives the encoded bytes and those boxes through
`external_source`, decodes only the whole pixels around the crop (`decoders.image_slice`;
`device="mixed"` = nvJPEG on a GPU, `"cpu"` with `device_id=None` elsewhere), resizes the box inside
them to S x S (cubic, antialiased; a region of interest, so a center crop's half-pixel box is
resampled as PIL does, not rounded), mirrors it and writes (B, 3, S, S) float32 in [-1, 1]. The two
loaders therefore see the same crops; pixel values differ by the resampling filters (and DALI drops
alpha where PIL composites on white). Precomputed latents never pass through DALI: their moments are
read and mirrored on the host, as the PIL loader does (`read_moments`), so both loaders give equal
`latent_moments`.

A file DALI cannot decode aborts its pipeline: the loaders rely on `unigendet data check`'s
quarantine list, and a failing batch is re-decoded with PIL to name the bad file in the error.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch

from ..batch import Batch, DataError
from ..images import crop_plan, decode_rgb, image_size
from ..index import FolderIndex
from ..quarantine import check_command
from .pil import FolderLoader, read_moments


def dali_reason() -> str | None:
    """None when DALI can be imported, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install: reported, never hidden
        return f"nvidia-dali is not usable here ({type(exc).__name__}: {exc})"
    return None


class DaliLoader(FolderLoader):
    """`FolderLoader` with a DALI pipeline behind `__iter__` (module docstring)."""

    def __init__(self, index: FolderIndex, image_size: int, batch_size: int, *, device: str = "cpu",
                 num_workers: int = 2, prefetch: int = 2, **kwargs):
        """num_workers: DALI's threads (data.num_workers, at least 1); prefetch: batches DALI prepares ahead."""
        kwargs.pop("pin_memory", None)  # DALI writes into its own (pinned or device) buffers
        super().__init__(index, image_size, batch_size, num_workers=0, **kwargs)
        why = dali_reason()
        if why:
            raise DataError(f"data.loader = 'dali': {why}")
        self.device = torch.device(device)
        self.num_threads, self.prefetch = max(1, int(num_workers)), max(1, int(prefetch))
        self.output: torch.Tensor | None = None  # see write_into

    # ------------------------------------------------------------------ host side: files and boxes

    def _sample_input(self, epoch: int, i: int):
        """(encoded bytes, anchor (x, y) and shape (w, h) of the whole-pixel window around the crop box,
        the box inside that window as ROI start and end (y, x), flip flag) of dataset item i in `epoch`."""
        try:
            encoded = self.index.read_bytes(i)  # the one read of the file (or shard member)
            width, height = image_size(encoded)  # from the header: the size for the crop box
        except Exception as exc:
            raise DataError(f"bad file in dataset folder {self.index.root}: {self.index.files[i]}: cannot "
                            f"read image ({exc}); run `{check_command(self.index.root)}`") from None
        rng = random.Random(f"unigendet/{self.seed}/{epoch}/{i}")  # FolderDataset's stream
        (left, top, right, bottom), flip = crop_plan(width, height, rng, crop=self.dataset.crop,
                                                     crop_scale_min=self.dataset.crop_scale_min, flip=self.dataset.flip)
        x0, y0 = math.floor(left), math.floor(top)  # the window: center boxes have half-pixel edges
        x1, y1 = math.ceil(right), math.ceil(bottom)
        return (np.frombuffer(encoded, dtype=np.uint8), np.array([x0, y0], dtype=np.float32),
                np.array([x1 - x0, y1 - y0], dtype=np.float32), np.array([top - y0, left - x0], dtype=np.float32),
                np.array([bottom - y0, right - x0], dtype=np.float32), np.array(flip, dtype=np.int32))

    def _sample_inputs(self, epoch: int, indices: list[int]):
        """The per-sample inputs of `_sample_input` as lists (one per input), for one batch."""
        return tuple(map(list, zip(*(self._sample_input(epoch, i) for i in indices))))

    def _batch_moments(self, indices: list[int], flips: list) -> torch.Tensor | None:
        """(B, 2C, h, w) precomputed moments of a batch, mirrored where its images are; None without latents."""
        if not self.latents:
            return None
        moments = torch.stack([read_moments(self.index, i) for i in indices])  # (B, 2C, h, w)
        mirrored = torch.tensor([bool(f) for f in flips])  # (B,)
        moments[mirrored] = moments[mirrored].flip(-1)
        return moments.pin_memory() if self.device.type == "cuda" else moments

    # ------------------------------------------------------------------ the DALI pipeline

    def _build(self, source):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"

        # CPU: the pipelined executor (exec_dynamic=False) keeps the 2 threads busier than DALI 2's
        # default dynamic one: +10-20% images/s on the demo data (bench/bench_data.py), same output.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=self.prefetch,
                      seed=self.seed, exec_dynamic=gpu)
        def pipeline():
            data, anchor, shape, roi_start, roi_end, flip = fn.external_source(
                source=source, num_outputs=6, batch=True, dtype=[types.UINT8] + [types.FLOAT] * 4 + [types.INT32])
            img = fn.decoders.image_slice(data, anchor, shape, axis_names="WH", normalized_anchor=False,
                                          normalized_shape=False, device="mixed" if gpu else "cpu",
                                          output_type=types.RGB)
            img = fn.resize(img, size=[self.image_size, self.image_size], roi_start=roi_start, roi_end=roi_end,
                            roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(img, mirror=flip, mean=[127.5] * 3, std=[127.5] * 3,
                                            output_layout="CHW", dtype=types.FLOAT)

        pipe = pipeline()
        pipe.build()
        return pipe

    def __iter__(self) -> Iterator[Batch]:
        planned = self._plan(self._epoch, self._position)  # FolderLoader's batches, endless
        fed: list[tuple[tuple[int, int], list[int]]] = []  # handed to DALI, not yet yielded (prefetch)

        def source():
            after, keys = next(planned)
            indices = [i for _, i in keys]
            inputs = self._sample_inputs(keys[0][0], indices)
            fed.append((after, indices, self._batch_moments(indices, inputs[-1])))
            return inputs

        pipe = self._build(source)
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        while True:
            try:
                (out,) = pipe.run()
            except RuntimeError as exc:
                raise DataError(self._name_bad_file(fed[0][1] if fed else [], exc)) from None
            after, indices, moments = fed.pop(0)
            # the one copy out of DALI's buffers: into the consumer's buffer, else a new tensor
            images = self.output if self.output is not None else torch.empty(shape, device=self.device)
            gpu = images.is_cuda
            feed_ndarray(out.as_tensor(), images, cuda_stream=torch.cuda.current_stream(self.device) if gpu else None)
            is_fake = torch.tensor([float(self.index.is_fake[i]) for i in indices], pin_memory=gpu)
            class_ids = torch.tensor([int(self.index.class_ids[i]) for i in indices], dtype=torch.int64,
                                     pin_memory=gpu)  # pinned on GPU: asynchronous copies, no sync
            self._epoch, self._position = after  # counted before the yield, as in FolderLoader
            yield Batch(images, is_fake.to(self.device, non_blocking=True),
                        class_ids.to(self.device, non_blocking=True),
                        None if moments is None else moments.to(self.device, non_blocking=True))

    def write_into(self, images: torch.Tensor | None) -> None:
        """Decode every following batch straight into `images` ((B, 3, S, S) float32 on the loader's
        device, e.g. a trainer's static buffer for CUDA graphs): the yielded `Batch.images` is then
        that tensor, overwritten by the next batch. None: a new tensor per batch (the default)."""
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        if images is not None and (tuple(images.shape) != shape or images.dtype != torch.float32
                                   or images.device != self.device or not images.is_contiguous()):
            raise DataError(f"DaliLoader.write_into: need a contiguous float32 {shape} tensor on {self.device}, got "
                            f"{images.dtype} {tuple(images.shape)} on {images.device}")
        self.output = images

    def _name_bad_file(self, indices: list[int], exc: Exception) -> str:
        for i in indices:
            try:
                decode_rgb(self.index.read_bytes(i), self.index.files[i])
            except DataError as bad:
                return (f"bad file in dataset folder {self.index.root}: {bad}; run "
                        f"`{check_command(self.index.root)}` to list every unreadable file in a quarantine list, "
                        "which the loaders then skip")
        return f"DALI pipeline failed on a batch of {self.index.root}: {str(exc).splitlines()[0]}"
