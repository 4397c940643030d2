"""Deployment: the detector as a standalone ONNX / torch.export artefact that takes raw uint8 images.

    from unigendet.deploy import export_detector
    export_detector(model, "detector.onnx")   # or "detector.pt2"

Nothing here imports onnx or onnxscript until an ONNX file is written (`pip install "unigendet[export]"`).
"""
from .detector import DetectorForExport, detector_only
from .export import ExportError, export_detector, reference_ops
from .preprocess import center_crop_resize

__all__ = ["DetectorForExport", "detector_only", "ExportError", "export_detector", "reference_ops",
           "center_crop_resize"]
