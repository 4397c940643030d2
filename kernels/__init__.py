"""Triton kernels (installed as `unigendet.kernels`); each is reached through `unigendet.ops`."""
