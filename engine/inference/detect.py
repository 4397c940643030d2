"""`unigendet detect`: p_fake of many images, in batches, as text, CSV or JSON lines.

    rows = detect_files(model, paths, image_size=S, batch_size=32, device="cpu")  # one Row per path

Files are decoded by a few threads (Pillow releases the GIL while it decodes) while the model scores
the batch before: at most two batches of decoded images are held at any time, so the memory does
not grow with the number of files. Rows come out in input order. A file that cannot be read (not a
regular file, too large, truncated, not an image, ...) gets a row with its error and no p_fake; the
run goes on.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from ..data import IMAGE_EXTENSIONS, DataError, load_rgb

FORMATS = ("text", "csv", "jsonl")
COLUMNS = ("file", "p_fake", "label", "error")
LABEL_FAKE, LABEL_REAL = "generated", "real"
RESULT_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".tsv": "text"}


@dataclass
class Row:
    """One output row: `p_fake` and `label` for a scored file, `error` (one line) for one that failed."""

    file: str
    p_fake: float | None = None
    label: str | None = None
    error: str | None = None


def eval_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) float32 in [-1, 1]: the evaluation transform of the data loaders
    (shorter side to `size`, center crop, one bicubic resample, no flip)."""
    side = min(img.width, img.height)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    hwc = torch.from_numpy(np.array(out, dtype=np.uint8))  # (size, size, 3)
    return hwc.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)  # 0 -> -1, 255 -> +1 exactly


def error_text(path: str, exc: BaseException) -> str:
    """A one-line message naming `path`."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg if path in msg else f"{path}: {msg}"


def _load(path: str, size: int, max_file_mb: int | None) -> tuple[str, torch.Tensor | None, str | None]:
    try:
        return path, eval_tensor(load_rgb(path, max_file_mb), size), None
    except (DataError, OSError, ValueError) as e:  # load_rgb names the file; OSError: e.g. a path too long
        return path, None, error_text(path, e)


def _decoded(paths: Iterable[str], load: Callable, workers: int, window: int) -> Iterator[tuple]:
    """load(path) for each path, in order, with at most `window` files decoded ahead of the consumer."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unigendet-decode") as pool:
        pending: deque = deque()
        todo = iter(paths)
        for path in todo:
            pending.append(pool.submit(load, path))
            if len(pending) >= window:
                break
        while pending:
            done = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            yield done.result()


def detect_files(model, paths: list[str], *, image_size: int, batch_size: int, device, threshold: float = 0.5,
                 max_file_mb: int | None = None, workers: int = 2,
                 progress: Callable[[int], None] | None = None) -> Iterator[list[Row]]:
    """Score `paths` with `model.p_fake`; yields the rows of each batch of `batch_size` paths in order.
    `progress(k)` is called with the number of paths each batch finished."""
    batch: list[tuple] = []

    def flush() -> list[Row]:
        good = [(i, x) for i, (_, x, _) in enumerate(batch) if x is not None]
        p = np.empty(0)
        if good:
            with torch.no_grad():
                x = torch.stack([t for _, t in good]).to(device)  # (B, 3, S, S)
                p = model.p_fake(x).double().cpu().numpy()  # (B,)
        rows = [Row(path, error=err) for path, _, err in batch]
        for (i, _), value in zip(good, p):
            rows[i] = Row(batch[i][0], float(value), LABEL_FAKE if value >= threshold else LABEL_REAL)
        if progress is not None:
            progress(len(batch))
        batch.clear()
        return rows

    load = lambda path: _load(path, image_size, max_file_mb)  # noqa: E731
    for item in _decoded(paths, load, workers, window=2 * batch_size):
        batch.append(item)
        if len(batch) == batch_size:
            yield flush()
    if batch:
        yield flush()


# ----------------------------------------------------------------------------- output


def format_for(out: str | None, fmt: str | None) -> str:
    """The output format: `fmt` when given, else from --out's extension, else text."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise DataError(f"--format {fmt!r} is not one of {FORMATS}")
        return fmt
    if out is None:
        return "text"
    ext = os.path.splitext(out)[1].lower()
    if ext not in RESULT_EXTENSIONS:
        raise DataError(f"--out {out}: cannot tell the format from the extension {ext!r}; use .csv or .jsonl, "
                        f"or give --format ({', '.join(FORMATS)})")
    return RESULT_EXTENSIONS[ext]


def check_results_path(out: str) -> None:
    """--out must be a new or existing file (not an image, not a folder) in an existing folder."""
    if os.path.splitext(out)[1].lower() in IMAGE_EXTENSIONS:
        raise DataError(f"--out {out}: has an image extension; give a results file such as results.csv")
    if os.path.isdir(out):
        raise DataError(f"--out {out}: is a folder; give a file name such as {os.path.join(out, 'results.csv')}")
    folder = os.path.dirname(out) or "."
    if not os.path.isdir(folder):
        raise DataError(f"--out {out}: folder {folder} does not exist")


class RowWriter:
    """Writes rows as text (`FILE<TAB>p_fake=0.1234<TAB>label`, `ERROR message`), CSV (header `file,
    p_fake,label,error`; empty fields where absent) or JSON lines (every key, null where absent)."""

    def __init__(self, stream: TextIO, fmt: str):
        self.stream, self.fmt = stream, fmt
        self._csv = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(COLUMNS)

    def write(self, rows: Iterable[Row]) -> None:
        for row in rows:
            if self.fmt == "jsonl":
                self.stream.write(json.dumps({k: getattr(row, k) for k in COLUMNS}) + "\n")
            elif self._csv is not None:
                self._csv.writerow([row.file, "" if row.p_fake is None else repr(row.p_fake), row.label or "",
                                    row.error or ""])
            elif row.error is not None:
                self.stream.write(f"ERROR {row.error}\n")
            else:
                self.stream.write(f"{row.file}\tp_fake={row.p_fake:.4f}\t{row.label}\n")
        self.stream.flush()  # a long run's results are on disk as they come


# ----------------------------------------------------------------------------- the command


@dataclass
class Summary:
    scored: int = 0
    errors: int = 0
    skipped: int = 0  # files under folders / matched by globs that are not images
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else math.inf

    def line(self) -> str:
        skipped = f", {self.skipped} non-image file(s) skipped" if self.skipped else ""
        return (f"# detect: {self.scored} image(s) scored, {self.errors} error(s){skipped} in {self.seconds:.1f} s "
                f"({self.images_per_s:.1f} images/s)")


def run_detect(model, inputs, stream: TextIO, *, fmt: str, image_size: int, batch_size: int, device,
               threshold: float = 0.5, max_file_mb: int | None = None, workers: int = 2,
               show_progress: bool = False) -> Summary:
    """Score `inputs` (an `Inputs`), writing rows to `stream` in `fmt` as each batch finishes."""
    from tqdm.auto import tqdm

    writer = RowWriter(stream, fmt)
    summary = Summary(skipped=inputs.skipped)
    problems = [Row(argument, error=reason) for argument, reason in inputs.problems]
    writer.write(problems)
    summary.errors += len(problems)
    bar = tqdm(total=len(inputs.paths), unit="img", disable=not show_progress, dynamic_ncols=True, leave=False)
    t0 = time.perf_counter()
    try:
        for rows in detect_files(model, inputs.paths, image_size=image_size, batch_size=batch_size, device=device,
                                 threshold=threshold, max_file_mb=max_file_mb, workers=workers,
                                 progress=bar.update):
            writer.write(rows)
            failed = sum(r.error is not None for r in rows)
            summary.errors += failed
            summary.scored += len(rows) - failed
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary
