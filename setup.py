"""Packaging for unigendet.

The top-level folders of the repository are the architecture (see DESIGN.md section 2):
`engine/` is installed as the import package `unigendet`, `kernels/` as `unigendet.kernels`.
"""
from setuptools import setup

setup(
    name="unigendet",
    version="0.1.0",
    description="Fused-kernel training engine for co-evolutionary image generation and detection (UniGenDet)",
    python_requires=">=3.10",
    packages=[
        "unigendet",
        "unigendet.ops",
        "unigendet.model",
        "unigendet.data",
        "unigendet.train",
        "unigendet.eval",
        "unigendet.kernels",
    ],
    package_dir={"unigendet": "engine", "unigendet.kernels": "kernels"},
    package_data={"unigendet": ["configs/*.toml"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "scipy",
        "pillow",
        "safetensors",
        "tqdm",
        "scikit-learn",
        "scikit-image",
    ],
    entry_points={"console_scripts": ["unigendet = unigendet.cli:main"]},
)
