"""Per-sample Gaussian noise from integer seeds: counter-based, vectorised, device-independent.

Sample i of a request gets its noise from its own seed alone, so an image never depends on how the
request is split into batches, and the integer maths gives the same bits on CPU and GPU. The
generator is SplitMix64 (Steele et al. 2014) used as a counter-based hash, followed by Box-Muller.
"""

from __future__ import annotations

import math

import torch

_M64 = 1 << 64


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return c - _M64 if c >= 1 << 63 else c


GOLDEN = _i64(0x9E3779B97F4A7C15)
MIX1 = _i64(0xBF58476D1CE4E5B9)
MIX2 = _i64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser; int64 multiplication wraps modulo 2^64."""
    z = (z ^ _shr(z, 30)) * MIX1
    z = (z ^ _shr(z, 27)) * MIX2
    return z ^ _shr(z, 31)


def uniform_bits(seeds: torch.Tensor, count: int, stream: int) -> torch.Tensor:
    """(B, count) uniforms in (0, 1), float64: output k of stream s of seed i is mix(key_i + (s*count + k + 1) * GOLDEN)."""
    key = mix64(seeds.to(torch.int64) ^ 0x5DEECE66D)[:, None]  # (B, 1): decorrelate adjacent seeds
    k = torch.arange(count, device=seeds.device, dtype=torch.int64) + (stream * count + 1)
    z = mix64(key + k[None] * GOLDEN)  # (B, count)
    return (_shr(z, 11).to(torch.float64) + 0.5) * 2.0**-53


def seeded_normal(seeds: torch.Tensor, shape: tuple[int, ...], stream: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *shape) standard normals; row i depends only on (seeds[i], stream). Box-Muller transform."""
    n = math.prod(shape)
    u = uniform_bits(seeds, 2 * n, stream)
    r = torch.sqrt(-2.0 * torch.log(u[:, :n]))
    return (r * torch.cos(2.0 * math.pi * u[:, n:])).to(dtype).view(-1, *shape)
