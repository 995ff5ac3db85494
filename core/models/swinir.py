"""SwinIR for super-resolution (JingyunLiang/SwinIR models/network_swinir.py), method.md §2.2.

Module and parameter/buffer names match the official file, so official checkpoints load strictly:
`layers.{k}.residual_group.blocks.{j}.{norm1,attn.*,norm2,mlp.*,attn_mask}`, `layers.{k}.conv`,
`conv_first`, `patch_embed.norm`, `norm`, `conv_after_body`, and the reconstruction tail.

Differences from the official file, none of which change outputs:
- forward reflect-pads H, W to a window multiple only when needed and crops back (as the 2022 file);
- the shifted-window mask for sizes other than img_size is built once per forward (and cached per
  size) rather than once per block;
- the mask is cast to the activations' dtype so bf16 inference works;
- attention is explicit matmuls (never SDPA, whose CPU FLOPs the counter misses, method.md §8).
Only the 'pixelshuffle' (classical) and 'pixelshuffledirect' (lightweight) tails and '1conv' exist here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import CheckpointError, UserError
from core.models.config import SwinIRConfig
from core.models.edsr import DIV2K_RGB_MEAN, Upsample
from core.models.statedict import count_indexed, scale_from_pixelshuffle_conv, scale_from_upsample

# Channel width of the classical ('pixelshuffle') reconstruction tail, fixed in the official code.
CLASSICAL_TAIL_FEAT = 64
# Cached shift masks per model; one 640x360 mask is ~59 MB, so keep only the most recent sizes.
MASK_CACHE_SIZE = 2


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (B * nW, window_size, window_size, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Inverse of window_partition: (B * nW, ws, ws, C) -> (B, H, W, C)."""
    b = windows.shape[0] // ((h // window_size) * (w // window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def relative_position_index(window_size: int) -> Tensor:
    """(ws², ws²) int64: (dy + ws - 1) * (2 ws - 1) + (dx + ws - 1) for every token pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # 2, ws*ws
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[:, :, 0] * (2 * window_size - 1) + relative[:, :, 1]


def shifted_window_mask(
    h: int, w: int, window_size: int, shift_size: int, device: torch.device | str | None = None
) -> Tensor:
    """(nW, ws², ws²) float32: -100 between tokens that came from different regions after the roll."""
    region = torch.zeros((1, h, w, 1), device=device)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bounds:
        for cols in bounds:
            region[:, rows, cols, :] = label
            label += 1
    windows = window_partition(region, window_size).view(-1, window_size * window_size)
    different = windows.unsqueeze(1) - windows.unsqueeze(2)
    return different.masked_fill(different != 0, -100.0).masked_fill(different == 0, 0.0)


def trunc_normal_(tensor: Tensor, std: float, bound: float = 2.0) -> Tensor:
    """timm's truncated normal (mean 0, cut at +-bound absolute), by inverse-CDF sampling.

    Same distribution as torch.nn.init.trunc_normal_, whose rejection sampling in torch 2.13
    takes seconds for SwinIR-M's 11M weights.
    """
    cdf = lambda v: 0.5 * (1.0 + math.erf(v / std / math.sqrt(2.0)))
    with torch.no_grad():
        tensor.uniform_(2 * cdf(-bound) - 1, 2 * cdf(bound) - 1).erfinv_()
        return tensor.mul_(std * math.sqrt(2.0)).clamp_(-bound, bound)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm's DropPath), identity in eval mode."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    return x * keep.div_(keep_prob)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ws x ws windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        # The explicit matmul + bias + mask + softmax below is the reference (and what FLOP counting
        # sees); `fused` (an inference option, core.infer) runs the same math through SDPA.
        self.fused = False

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.fused:
            return self._fused_forward(x, mask)
        b_windows, n, c = x.shape
        qkv = self.qkv(x).reshape(b_windows, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B*nW, heads, N, N

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = attn.view(b_windows // n_windows, n_windows, self.num_heads, n, n)
            attn = (attn + mask.to(attn.dtype).unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b_windows, n, c))

    def _fused_forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """`forward` through `F.scaled_dot_product_attention` (same inputs and result).

        Every window gets the relative-position bias as a broadcast mask (no copy). The shift mask is
        non-zero only in the last row and column of windows, so only those windows are attended again
        with bias + mask, instead of materialising a (windows, heads, 64, 64) mask for all of them.
        """
        b_windows, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b_windows, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        table = self.relative_position_bias_table
        bias = table[self.relative_position_index.view(-1)].view(n, n, heads).permute(2, 0, 1)
        bias = bias.unsqueeze(0).to(q.dtype)  # (1, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        if mask is not None:
            n_windows = mask.shape[0]
            masked = mask.ne(0).flatten(1).any(1).nonzero().squeeze(1)  # windows that straddle regions
            if masked.numel():
                images = b_windows // n_windows
                offsets = n_windows * torch.arange(images, device=x.device)
                rows = (masked[None, :] + offsets[:, None]).flatten()
                window_mask = bias + mask[masked].to(q.dtype).unsqueeze(1).repeat(images, 1, 1, 1)
                out[rows] = F.scaled_dot_product_attention(
                    q[rows], k[rows], v[rows], attn_mask=window_mask, scale=self.scale
                )
        return self.proj(out.transpose(1, 2).reshape(b_windows, n, c))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (S)W-MSA + MLP. Odd blocks roll by window_size // 2 and own an `attn_mask` buffer."""

    def __init__(
        self,
        dim: int,
        img_size: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
        img_size_mask: Tensor | None,
    ) -> None:
        """img_size_mask: the shift mask for img_size (shared input; each shifted block keeps a copy)."""
        super().__init__()
        self.img_size = img_size
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path_prob = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if shift_size > 0:
            assert img_size_mask is not None
            self.register_buffer("attn_mask", img_size_mask.clone())
        else:
            self.attn_mask = None

    def forward(self, x: Tensor, x_size: tuple[int, int], mask_for_size: Tensor | None) -> Tensor:
        """mask_for_size: the shift mask for x_size, used when x_size differs from img_size."""
        h, w = x_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, c)

        mask = None
        if self.shift_size > 0:
            mask = self.attn_mask if x_size == (self.img_size, self.img_size) else mask_for_size
        windows = self.attn(windows, mask=mask)

        x = window_reverse(windows.view(-1, self.window_size, self.window_size, c), self.window_size, h, w)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + drop_path(x.view(b, h * w, c), self.drop_path_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_prob, self.training)


class BasicLayer(nn.Module):
    """The STLs of one RSTB; exists only to give the official `residual_group.blocks.{j}` names."""

    def __init__(self, blocks: list[SwinTransformerBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, x_size: tuple[int, int], mask_for_size: Tensor | None) -> Tensor:
        for block in self.blocks:
            x = block(x, x_size, mask_for_size)
        return x


def tokens_to_map(x: Tensor, x_size: tuple[int, int]) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W) (official PatchUnEmbed with patch size 1)."""
    b, _, c = x.shape
    return x.transpose(1, 2).view(b, c, x_size[0], x_size[1])


class RSTB(nn.Module):
    """Residual Swin Transformer Block: STLs, then a 3x3 conv on the map, plus the block input."""

    def __init__(self, dim: int, blocks: list[SwinTransformerBlock]) -> None:
        super().__init__()
        self.residual_group = BasicLayer(blocks)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: Tensor, x_size: tuple[int, int], mask_for_size: Tensor | None) -> Tensor:
        out = tokens_to_map(self.residual_group(x, x_size, mask_for_size), x_size)
        return self.conv(out).flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Flatten the map to tokens and LayerNorm them (patch size 1, patch_norm=True)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))


class SwinIR(nn.Module):
    def __init__(self, config: SwinIRConfig) -> None:
        super().__init__()
        self.config = config
        dim, ws = config.embed_dim, config.window_size
        self.window_size = ws
        self.shift_size = ws // 2
        self.register_buffer("mean", torch.tensor(DIV2K_RGB_MEAN).view(1, 3, 1, 1), persistent=False)
        self._mask_cache: dict[tuple[int, int, str], Tensor] = {}

        self.conv_first = nn.Conv2d(3, dim, 3, 1, 1)
        self.patch_embed = PatchEmbed(dim)
        # Stochastic depth grows linearly over all STLs of the network.
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        img_size_mask = shifted_window_mask(config.img_size, config.img_size, ws, self.shift_size)
        first = 0
        for depth, heads in zip(config.depths, config.num_heads, strict=True):
            blocks = [
                SwinTransformerBlock(
                    dim,
                    config.img_size,
                    heads,
                    ws,
                    shift_size=0 if j % 2 == 0 else self.shift_size,
                    mlp_ratio=config.mlp_ratio,
                    drop_path=rates[first + j],
                    img_size_mask=img_size_mask,
                )
                for j in range(depth)
            ]
            self.layers.append(RSTB(dim, blocks))
            first += depth
        self.norm = nn.LayerNorm(dim)
        self.conv_after_body = nn.Conv2d(dim, dim, 3, 1, 1)

        if config.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(
                nn.Conv2d(dim, CLASSICAL_TAIL_FEAT, 3, 1, 1), nn.LeakyReLU(0.01)
            )
            self.upsample = Upsample(config.scale, CLASSICAL_TAIL_FEAT)
            self.conv_last = nn.Conv2d(CLASSICAL_TAIL_FEAT, 3, 3, 1, 1)
        else:
            self.upsample = nn.Sequential(
                nn.Conv2d(dim, 3 * config.scale**2, 3, 1, 1), nn.PixelShuffle(config.scale)
            )
        self.apply(_init_weights)

    def _mask_for_size(self, x_size: tuple[int, int], device: torch.device) -> Tensor | None:
        has_shift = any(d > 1 for d in self.config.depths)
        if not has_shift or x_size == (self.config.img_size, self.config.img_size):
            return None
        key = (x_size[0], x_size[1], str(device))
        if key not in self._mask_cache:
            while len(self._mask_cache) >= MASK_CACHE_SIZE:  # evict the oldest; tolerant of a racing thread
                self._mask_cache.pop(next(iter(self._mask_cache), None), None)
            self._mask_cache[key] = shifted_window_mask(*x_size, self.window_size, self.shift_size, device)
        return self._mask_cache[key]

    def pad_to_window(self, x: Tensor) -> Tensor:
        """Reflect-pad bottom/right to a multiple of the window; a no-op when already aligned."""
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.window_size, (-w) % self.window_size
        if pad_h == 0 and pad_w == 0:
            return x
        if pad_h >= h or pad_w >= w:
            raise UserError(
                f"SwinIR input {w}x{h} is too small to reflect-pad to a multiple of {self.window_size}"
            )
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")

    def forward_features(self, x: Tensor) -> Tensor:
        x_size = (x.shape[2], x.shape[3])
        mask_for_size = self._mask_for_size(x_size, x.device)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x, x_size, mask_for_size)
        return tokens_to_map(self.norm(x), x_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.to(x.dtype)
        x = (self.pad_to_window(x) - mean) * self.config.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        if self.config.upsampler == "pixelshuffle":
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        else:
            x = self.upsample(x)
        x = x / self.config.img_range + mean
        return x[:, :, : h * self.config.scale, : w * self.config.scale]


def _init_weights(module: nn.Module) -> None:
    """Official init: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0); convs keep PyTorch's."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --- reading checkpoints (core.models.checkpoint dispatches here) -------------------------------------


def matches(sd: dict[str, Tensor]) -> bool:
    return "conv_first.weight" in sd and "layers.0.residual_group.blocks.0.attn.qkv.weight" in sd


def detect(sd: dict[str, Tensor]) -> tuple[SwinIRConfig, list[str]]:
    notes: list[str] = []
    if "conv_after_body.0.weight" in sd:
        raise CheckpointError("SwinIR with resi_connection '3conv' is not supported (only '1conv')")
    if "conv_up1.weight" in sd:
        raise CheckpointError(
            "SwinIR 'nearest+conv' (real-world SR) is not supported; use a classical or lightweight one"
        )
    embed_dim = sd["conv_first.weight"].shape[0]
    n_layers = count_indexed(sd, "layers.{}.residual_group.blocks.0.norm1.weight")
    depths = tuple(
        count_indexed(sd, f"layers.{k}.residual_group.blocks.{{}}.norm1.weight") for k in range(n_layers)
    )
    heads = tuple(
        sd[f"layers.{k}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
        for k in range(n_layers)
    )
    table_rows = sd["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape[0]
    window_size = (math.isqrt(table_rows) + 1) // 2
    mlp_ratio = sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim

    img_size = 64
    mask_key = next((key for key in sd if key.endswith(".attn_mask")), None)
    if mask_key is not None:
        windows_per_side = math.isqrt(sd[mask_key].shape[0])
        img_size = windows_per_side * window_size
        if img_size != 64:
            notes.append(f"img_size {img_size} taken from the attn_mask shape {tuple(sd[mask_key].shape)}")

    if "conv_before_upsample.0.weight" in sd:
        upsampler = "pixelshuffle"
        scale = scale_from_upsample(sd, sd["conv_before_upsample.0.weight"].shape[0])
    elif "upsample.0.weight" in sd:
        upsampler = "pixelshuffledirect"
        scale = scale_from_pixelshuffle_conv(sd["upsample.0.weight"].shape[0], "upsample.0")
    else:
        raise CheckpointError("SwinIR without an SR upsampler (denoising/JPEG) is not supported")
    config = SwinIRConfig(
        scale=scale,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        upsampler=upsampler,
        img_size=img_size,
    )
    return config, notes
