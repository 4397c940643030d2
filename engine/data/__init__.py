"""Data: the `Batch` contract, image decoding, loaders over image folders and webdataset shards, the
bad-file check and its quarantine list, and the embedded demo dataset.

Label convention: `is_fake = 1.0` marks a generated image, `0.0` a real one.

Layers: a module imports only modules of lower layers, so imports point one way and no module
imports another inside a function to dodge a cycle (functions import only optional third-party
packages, nvidia.dali). Importing a module of a subpackage runs the subpackage first (loaders.pil
runs loaders), so it counts as importing both. tests/test_data_layout.py reads this table and checks
the imports against it.

    8  __init__         the public names below
    7  pack             image folder -> webdataset shards (with --vae: + each image's VAE moments);
                           decodes every image first with `check`
    7  eval_images      `load_eval_images`: the deterministic evaluation set as tensors
    6  check            decode every image of a data root, classify the failures (`data check`)
    6  loaders          `LOADER_NAMES` and `build_loader`: picks loaders.pil or loaders.dali
    5  sources          `scan_data`: picks sources.folder or sources.shards by what the root holds
    5  loaders.dali     `DaliLoader`: the batches of loaders.pil, decoded by an NVIDIA DALI pipeline
    4  sources.folder   `scan_folder`: root/real + root/fake -> `FolderIndex`; reads the files
    4  sources.shards   `scan_shards`: webdataset shards -> `FolderIndex`; reads the tar members
    4  loaders.pil      `FolderDataset`, `FolderLoader`: PIL decoding in DataLoader workers
    3  quarantine       the quarantine list, `drop_quarantined`, the `data check` command line
    2  index            `FolderIndex`: samples, labels, classes and the reader of their bytes
    1  images           finding image files, decoding them to RGB, crop and resize
    1  latents          precomputed latents: a sample's moments member, the pack's VAE and size
    1  demo             the embedded demo dataset
    0  batch            `Batch`, `DataError`, collation
"""
from .batch import Batch, DataError
from .check import CheckResult, check_folder
from .demo import write_demo_dataset
from .eval_images import load_eval_images
from .images import IMAGE_EXTENSIONS, load_rgb
from .index import FolderIndex
from .loaders import LOADER_NAMES, build_loader
from .loaders.pil import FolderDataset, FolderLoader
from .pack import pack_folder
from .quarantine import QUARANTINE_NAME, REASONS, BadFile, default_quarantine_path, read_quarantine
from .sources import scan_data
from .sources.folder import scan_folder
from .sources.shards import scan_shards

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
    "LOADER_NAMES",
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
