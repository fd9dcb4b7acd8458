"""Building blocks shared by the VAE and the UNet."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) (DDPM / Transformer)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, x * sigmoid(x); without autograd, computed so that each element's bits depend on its value alone.

    ``F.silu``'s CPU kernel runs whole SIMD vectors and finishes each chunk's last few elements with a scalar
    formula that rounds differently (measured: 4% of float32 values differ by an ulp), so an element's result
    depended on where it fell in the tensor: on the batch size, its position, the thread count and the CPU's
    vector width (AVX2 vs AVX-512). Here: exp (a vectorised map whose tail is a masked vector, so every
    element gets the same code) and IEEE-exact add and divide. ~1.5x F.silu's time on a feature map.
    Training (autograd on) keeps F.silu's fused backward: the forward values agree to an ulp.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return F.silu(x)
    d = torch.neg(x)
    d.exp_()
    d.add_(1.0)
    return torch.div(x, d)


class SiLU(nn.Module):
    """``silu`` as a module, for nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a skip; optional (scale, shift) conditioning from an embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # FiLM-style scale/shift of the second norm (the "adaptive group norm" of Dhariwal & Nichol 2021).
        self.emb = nn.Linear(emb_dim, 2 * out_ch) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stabler early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = rearrange(self.emb(silu(emb)), "b (two c) -> two b c 1 1", two=2)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the spatial positions of a feature map, with a residual."""

    def __init__(self, ch: int, num_heads: int = 4, groups: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(self.norm(x))
        # (B, 3*C, H, W) -> 3 x (B, heads, H*W, C/heads)
        q, k, v = rearrange(qkv, "b (three n d) h w -> three b n (h w) d", three=3, n=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=h, w=w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; odd sizes round up (7 -> 4)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to an explicit size (so 4 -> 7 undoes 7 -> 4), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
