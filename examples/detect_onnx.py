"""Score image files with the exported detector, using only onnxruntime, numpy and Pillow.

    unigendet export --ckpt runs/demo --out detector.onnx
    python examples/detect_onnx.py detector.onnx photo.jpg scan.png ...

One line per file: FILE<TAB>p_fake=0.123456<TAB>generated|real (generated when p_fake >= 0.5). The
model resizes and crops inside; it wants RGB pixels as `unigendet detect` reads them (transparency
over white; 16-bit images are scaled to 8 bits differently by this short decoder).
"""
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def rgb_pixels(path: str) -> np.ndarray:
    """uint8 (H, W, 3); transparent pixels composited over white."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def main(model_path: str, files: list[str]) -> None:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    for path in files:
        (p_fake,) = session.run(["p_fake"], {"images": rgb_pixels(path)[None]})[0]  # a batch of one
        print(f"{path}\tp_fake={p_fake:.6f}\t{'generated' if p_fake >= 0.5 else 'real'}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python examples/detect_onnx.py detector.onnx IMAGE [IMAGE ...]")
    main(sys.argv[1], sys.argv[2:])
