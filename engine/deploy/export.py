"""`unigendet export`: write the detector as an ONNX file (`.onnx`) or a torch.export program (`.pt2`).

    export_detector(model, "detector.onnx")     # model: a loaded UniGenDet, e.g. from load_model(ckpt)

The artefact (both formats):
    input  `images`  uint8 (B, H, W, 3): RGB pixels, any batch size B >= 1, any height and width
                     (one image: add a batch axis of 1; a batch holds images of one size)
    output `p_fake`  float32 (B,): probability that each image is generated (label 1 = generated)
Inside: shorter side to S, center crop, Pillow's antialiased bicubic resample (bit for bit, see
`preprocess`), scaling to [-1, 1], the detection pass (`detector.DetectorForExport`). Decoding the
file into RGB stays with the caller (`unigendet detect` composites transparency over white). The
resampling uses dense coefficient matrices: about 1 s for a 12-megapixel photo at S = 64 on one CPU
core under onnxruntime (Pillow itself: 0.15 s).

ONNX: `torch.onnx.export(dynamo=True)`, the exporter built on torch.export: it keeps the dynamic
batch, height and width as symbolic dimensions and turns the pass-order branch of the resampling
(`torch.cond`) into an ONNX `If` (opset 20); the TorchScript exporter would trace one shape's Python branch and
bake the shape-derived coefficients in as constants. It needs the packages onnx and onnxscript
(`pip install "unigendet[export]"`), imported only here. The fused ops run on the reference backend
while tracing (`reference_ops`), so the graph holds only standard operators.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from ..backends import ENV_VAR
from .detector import DetectorForExport

FORMATS = {".onnx": "onnx", ".pt2": "torch.export"}
INPUT_NAME, OUTPUT_NAME = "images", "p_fake"
EXPORT_EXTRA = 'pip install "unigendet[export]"'
# traced with a batch of 2 images of 37 x 53: sizes no dimension shares (torch.export treats 0 and
# 1 as special and would merge dimensions of equal size), neither square nor the model's size
EXAMPLE_SHAPE = (2, 37, 53, 3)


class ExportError(RuntimeError):
    """The export cannot be done as asked (unknown suffix, missing package); one line."""


def check_out(path: str | os.PathLike) -> str:
    """The format for `path`, "onnx" or "torch.export", from its suffix; ExportError for another
    suffix, a folder, a folder that does not exist, or (.onnx) onnx / onnxscript not installed:
    all checked before any work is done."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(f"--out {path}: unknown suffix {suffix or '(none)'!r}; use .onnx (ONNX) or .pt2 "
                          "(torch.export)")
    if path.is_dir():
        raise ExportError(f"--out {path}: is a folder; give a file name such as {path / ('detector' + suffix)}")
    if not path.parent.is_dir():
        raise ExportError(f"--out {path}: folder {path.parent} does not exist")
    if FORMATS[suffix] == "onnx":
        require_onnx_packages("onnx", "onnxscript")
    return FORMATS[suffix]


def require_onnx_packages(*modules: str) -> None:
    """Import `modules` (e.g. onnx, onnxscript) or fail with one line naming the install extra."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"ONNX export needs the package(s) {', '.join(missing)}: {EXPORT_EXTRA}")


@contextlib.contextmanager
def reference_ops():
    """Every fused op on the reference backend (plain torch operators) inside the block; the
    environment override `UNIGENDET_BACKEND` is the one choice that outranks all others, so it is
    set here and restored after."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "reference"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


@contextlib.contextmanager
def _quiet_torch_internals():
    """Hide torch's own notes that say nothing about this export: the ONNX registry's "torchvision is
    not installed" lines and a deprecation inside torch's pytree code."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        registry_log.setLevel(level)


def _dynamic_shapes() -> dict:
    dim = torch.export.Dim
    return {INPUT_NAME: {0: dim("batch"), 1: dim("height"), 2: dim("width")}}


def artefact_metadata(wrapper: DetectorForExport, extra: dict | None = None) -> dict[str, str]:
    """String key/values stored in the artefact: what it takes and returns, how it resizes."""
    from .. import __version__

    meta = {
        "unigendet_version": __version__,
        "input": f"{INPUT_NAME}: uint8 (B, H, W, 3) RGB",
        "output": f"{OUTPUT_NAME}: float32 (B,), probability the image is generated (label 1 = generated)",
        "image_size": str(wrapper.image_size),
        "preprocessing": "shorter side to image_size, center crop, Pillow antialiased bicubic (fixed point), "
                         "x / 127.5 - 1",
        "vertical_first_when_tall": str(wrapper.vertical_first_when_tall).lower(),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def export_detector(model, path: str | os.PathLike, *, vertical_first_when_tall: bool | None = None,
                    metadata: dict | None = None) -> Path:
    """Write `model`'s detector (`DetectorForExport`) to `path`: ONNX for .onnx, torch.export for .pt2.

    metadata: extra string key/values to store (e.g. the checkpoint); returns the path written."""
    path = Path(path)
    fmt = check_out(path)
    wrapper = DetectorForExport(model, vertical_first_when_tall).eval()
    meta = artefact_metadata(wrapper, metadata)
    example = (torch.randint(0, 256, EXAMPLE_SHAPE, dtype=torch.uint8),)
    with reference_ops(), torch.no_grad(), _quiet_torch_internals():
        if fmt == "onnx":
            _export_onnx(wrapper, example, path, meta)
        else:
            program = torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes())
            torch.export.save(program, path, extra_files={"unigendet.json": json.dumps(meta)})
    return path


def _export_onnx(wrapper: DetectorForExport, example: tuple, path: Path, meta: dict[str, str]) -> None:
    program = torch.onnx.export(wrapper, example, dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_shapes(), verbose=False)
    program.model.metadata_props.update(meta)
    program.save(str(path))
