"""Throughput accounting: tokens and model FLOPs per training sample, and the device's bf16 peak.

The FLOP count is the usual transformer estimate (PaLM appendix B): 6 FLOPs per parameter per
token for forward + backward of the matrix multiplies, plus 12 * T_q * T_k * C per layer for the
attention scores and values. A sample holds both streams (G: N image tokens; D: N + registers),
each token passing through its own stream's expert; MMSA adds the cross-stream key pairs the
switches allow, in the MMSA layers (model.mmsa_layers) only. Phases that run one stream count less
in reality (and a pass skips the queries and MLP of the stream whose output it does not use in the
last layer that needs its keys), so the MFU reported from this count is an upper estimate,
tightest for joint runs.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig, mmsa_layer_set

# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, from the vendors' data sheets.
BF16_PEAK = {"H200": 989.4e12, "H100 SXM": 989.4e12, "H100 NVL": 835.5e12, "H100 PCIe": 756.0e12,
             "H100": 989.4e12, "A100": 312.0e12}


def tokens_per_sample(cfg: ModelConfig) -> int:
    """Tokens of one training sample over both streams."""
    n = (cfg.image_size // cfg.patch_size) ** 2
    return n + (n + cfg.registers)


def train_flops_per_sample(cfg: ModelConfig) -> float:
    """Forward + backward model FLOPs of one sample (estimate of the module docstring)."""
    C, n = cfg.width, (cfg.image_size // cfg.patch_size) ** 2
    t_g, t_d = n, n + cfg.registers
    ffn = int(cfg.mlp_ratio * C + 7) // 8 * 8
    head_dim = C // cfg.heads
    qkv = C * (cfg.heads + 2 * cfg.kv_heads) * head_dim
    per_layer_params = qkv + cfg.heads * head_dim * C + 2 * C * ffn + ffn * C  # qkv, out, gate_up, down
    dense = 6.0 * per_layer_params * cfg.depth * (t_g + t_d)
    self_pairs = (t_g * t_g + t_d * t_d) * cfg.depth
    cross_pairs = ((t_g * t_d if cfg.g2d else 0) + (t_d * t_g if cfg.d2g else 0)) * len(mmsa_layer_set(cfg))
    attention = 12.0 * (self_pairs + cross_pairs) * cfg.heads * head_dim
    return dense + attention


def device_peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a CUDA device found in BF16_PEAK, else None (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)
