"""VQGAN-style convolutional encoder / decoder blocks (residual blocks with GroupNorm + SiLU, attention at
the lowest resolution). Follows the taming-transformers layout: ``len(ch_mult) - 1`` stride-2 stages give
the downsampling factor (``ch_mult`` of length 3 -> f4, 4 -> f8, 5 -> f16)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    # The largest group count <= max_groups dividing the channels, so small configs (ch=16, 24, ...) work.
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (used only at the lowest resolution, where h*w is small)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding keeps an exact factor-2 reduction for even sizes (as in taming).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, use_attention: bool, dropout: float, norm_groups: int):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn = AttnBlock(channels, norm_groups) if use_attention else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        use_attention: bool,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        stages = []
        channels = ch
        for level, mult in enumerate(ch_mult):
            out = ch * mult
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(channels, out, dropout, norm_groups))
                channels = out
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(channels))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.mid = MidBlock(channels, use_attention, dropout, norm_groups)
        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.stages(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        out_channels: int,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        use_attention: bool,
        dropout: float,
        norm_groups: int,
    ):
        super().__init__()
        channels = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = MidBlock(channels, use_attention, dropout, norm_groups)
        stages = []
        for level in reversed(range(len(ch_mult))):
            out = ch * ch_mult[level]
            blocks: list[nn.Module] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, out, dropout, norm_groups))
                channels = out
            if level != 0:
                blocks.append(Upsample(channels))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm_out = group_norm(channels, norm_groups)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.stages(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "MidBlock", "ResnetBlock", "Upsample"]
