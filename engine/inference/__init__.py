"""Inference at scale: `detect` over many files in batches, `generate` into a folder with a manifest
and an authenticity gate."""
from .detect import COLUMNS, FORMATS, Row, RowWriter, Summary, detect_files, eval_tensor, run_detect
from .generate import (MANIFEST_NAME, FolderResult, SamplerSettings, check_gate, check_out, generate_to_folder,
                       read_manifest)
from .inputs import Inputs, expand_inputs

__all__ = ["COLUMNS", "FORMATS", "Row", "RowWriter", "Summary", "detect_files", "eval_tensor", "run_detect",
           "MANIFEST_NAME", "FolderResult", "SamplerSettings", "check_gate", "check_out", "generate_to_folder",
           "read_manifest", "Inputs", "expand_inputs"]
