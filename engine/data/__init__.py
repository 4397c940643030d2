"""Data: the `Batch` contract, image decoding, loaders over image folders and webdataset shards, the
bad-file check and its quarantine list, and the embedded demo dataset.

Label convention: `is_fake = 1.0` marks a generated image, `0.0` a real one.
"""
from .batch import Batch, DataError
from .check import CheckResult, check_folder
from .demo import write_demo_dataset
from .folder import (FolderDataset, FolderIndex, FolderLoader, build_loader, load_eval_images, scan_data,
                     scan_folder)
from .images import IMAGE_EXTENSIONS, load_rgb
from .shards import pack_folder, scan_shards
from .quarantine import QUARANTINE_NAME, REASONS, BadFile, default_quarantine_path, read_quarantine

__all__ = [
    "Batch",
    "DataError",
    "IMAGE_EXTENSIONS",
    "load_rgb",
    "scan_folder",
    "scan_data",
    "scan_shards",
    "pack_folder",
    "FolderIndex",
    "FolderDataset",
    "FolderLoader",
    "build_loader",
    "load_eval_images",
    "write_demo_dataset",
    "check_folder",
    "CheckResult",
    "BadFile",
    "QUARANTINE_NAME",
    "REASONS",
    "default_quarantine_path",
    "read_quarantine",
]
