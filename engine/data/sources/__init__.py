"""Data-root formats, each scanned into a `FolderIndex` whose `reader` reads its samples: an image
folder (`folder`: real/ + fake/) or webdataset shards (`shards`: written by `unigendet data pack`).
`scan_data` picks the format by what the root holds.
"""
from __future__ import annotations

import os

from ..index import FolderIndex
from .folder import scan_folder
from .shards import is_shards_root, scan_shards


def scan_data(root: str | os.PathLike, quarantine: str | os.PathLike | None = "") -> FolderIndex:
    """Index a data root of either layout: an image folder (`scan_folder`) or webdataset shards
    written by `unigendet data pack` (`scan_shards`)."""
    return scan_shards(root, quarantine) if is_shards_root(root) else scan_folder(root, quarantine)
