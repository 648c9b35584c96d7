"""DiffiT: Diffusion Vision Transformers (Hatamizadeh et al. 2023), image-space variant, EDM-preconditioned.

Module names are stable so LoRA can target layers by stage:

    tokenizer                       conv 3x3, in_channels -> channels[0]
    encoder.{s}.down                stride-2 conv channels[s-1] -> channels[s] (s > 0 only)
    encoder.{s}.blocks.{b}          ResBlocks at resolution image_size / 2**s; the last s is the bottleneck
    decoder.{s}.up                  nearest x2 + conv 3x3, channels[s+1] -> channels[s]
    decoder.{s}.skip                1x1 conv merging the concatenated encoder stage s output
    decoder.{s}.blocks.{b}          ResBlocks at the same resolution as encoder.{s}, s = stages-2 ... 0
    head.conv                       conv 3x3 channels[0] -> in_channels (zero-initialised)
    augment_embed                   augment_dim -> time_dim, no bias (only when augment_dim > 0)

Inside each ResBlock `...blocks.{b}`: `conv` (3x3), `block.attn.qkv`, `block.attn.qkv_temb`, `block.attn.proj`,
`block.mlp.fc1`, `block.mlp.fc2`. So `decoder.{s}` and `encoder.{s}` with the same s work at the same resolution.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups but at least 4 channels per group, so small models aren't per-channel."""
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels)


#################################################################################
#                          Time and label embedding                             #
#################################################################################


def positional_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the EDM noise level c_noise = ln(σ)/4, as in EDM's networks (endpoint=True)."""
    half = dim // 2
    freqs = (1.0 / max_period) ** (
        torch.arange(half, dtype=torch.float32, device=c_noise.device) / max(half - 1, 1)
    )
    args = c_noise.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=1)  # (N, dim)


#################################################################################
#                       Time-dependent window attention                         #
#################################################################################


def window_partition(x: Tensor, w: int) -> Tensor:
    """(N, H, W, C) -> (N * H/w * W/w, w*w, C): non-overlapping w x w windows."""
    n, h, wd, c = x.shape
    x = x.view(n, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_merge(x: Tensor, w: int, h: int, wd: int) -> Tensor:
    """Inverse of window_partition: (N * h/w * wd/w, w*w, C) -> (N, h, wd, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention in w x w windows with a Swin-style relative position bias."""

    def __init__(self, dim: int, time_dim: int, head_dim: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.window_size = window_size
        self.qkv = nn.Linear(dim, 3 * dim)
        # Paper: q, k, v = W·x_s + W_t·x_t. W_t has no bias: qkv already has one.
        self.qkv_temb = nn.Linear(time_dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

        w = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, self.num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(
            1
        )  # (2, L)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (L, L, 2), in [0, 2w-2]
        # Not persistent: it is a pure function of window_size, so checkpoints need not carry it.
        self.register_buffer(
            "relative_position_index", rel[..., 0] * (2 * w - 1) + rel[..., 1], persistent=False
        )

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        _, h, wd, c = x.shape  # (N, H, W, C)
        qkv = self.qkv(x) + self.qkv_temb(x_t)[:, None, None, :]  # (N, H, W, 3C)
        qkv = window_partition(qkv, self.window_size)  # (B, L, 3C), B = N * windows, L = w*w
        b, seq, _ = qkv.shape
        q, k, v = qkv.view(b, seq, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4
        )  # (B, heads, L, d)
        index: Tensor = self.relative_position_index  # type: ignore[assignment]
        bias = (
            self.relative_position_bias_table[index.view(-1)].view(seq, seq, -1).permute(2, 0, 1)
        )  # (heads, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, heads, L, d)
        out = out.transpose(1, 2).reshape(b, seq, c)  # (B, L, C)
        return self.proj(window_merge(out, self.window_size, h, wd))  # (N, H, W, C)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> GELU -> dropout -> fc2."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


#################################################################################
#                           DiffiT blocks and stages                            #
#################################################################################


class DiffiTBlock(nn.Module):
    """Transformer block: x̂ = TMSA(LN(x), x_t) + x;  x = MLP(LN(x̂)) + x̂."""

    def __init__(
        self, dim: int, time_dim: int, head_dim: int, window_size: int, mlp_ratio: float, dropout: float
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TMSA(dim, time_dim, head_dim, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), x_t)  # (N, H, W, C)
        return x + self.mlp(self.norm2(x))  # (N, H, W, C)


class ResBlock(nn.Module):
    """DiffiT ResBlock: x̂ = Conv3x3(Swish(GN(x)));  x = DiffiTBlock(x̂, x_t) + x."""

    def __init__(
        self, dim: int, time_dim: int, head_dim: int, window_size: int, mlp_ratio: float, dropout: float
    ):
        super().__init__()
        self.norm = _group_norm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.block = DiffiTBlock(dim, time_dim, head_dim, window_size, mlp_ratio, dropout)

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        h = self.conv(F.silu(self.norm(x)))  # (N, C, H, W)
        h = self.block(h.permute(0, 2, 3, 1), x_t).permute(0, 3, 1, 2)  # channels-last for the transformer
        return x + h  # (N, C, H, W)


class EncoderStage(nn.Module):
    """Optional stride-2 downsampling followed by `depth` ResBlocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, **block_args) -> None:
        super().__init__()
        self.down = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([ResBlock(dim, **block_args) for _ in range(depth)])

    def forward(self, x: Tensor, x_t: Tensor) -> Tensor:
        x = self.down(x)
        for block in self.blocks:
            x = block(x, x_t)
        return x


class DecoderStage(nn.Module):
    """Nearest x2 upsampling + conv, merge with the encoder skip, then `depth` ResBlocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, **block_args) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_dim, dim, 3, padding=1)
        )
        # Concat + 1x1 conv rather than add: the decoder learns how much of the (noisier, higher-frequency)
        # encoder features to keep, for only 2·C² parameters per stage.
        self.skip = nn.Conv2d(2 * dim, dim, 1)
        self.blocks = nn.ModuleList([ResBlock(dim, **block_args) for _ in range(depth)])

    def forward(self, x: Tensor, skip: Tensor, x_t: Tensor) -> Tensor:
        x = self.up(x)  # (N, C, H, W)
        x = self.skip(torch.cat([x, skip], dim=1))  # (N, 2C, H, W) -> (N, C, H, W)
        for block in self.blocks:
            x = block(x, x_t)
        return x


class FinalLayer(nn.Module):
    """GN -> Swish -> conv 3x3 back to image channels; zero-initialised so the net starts as D = c_skip·x."""

    def __init__(self, dim: int, out_channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(dim)
        self.conv = nn.Conv2d(dim, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.silu(self.norm(x)))


#################################################################################
#                                 DiffiT model                                  #
#################################################################################


class DiffiT(nn.Module):
    """U-shaped DiffiT denoiser D(x; σ, y) with EDM preconditioning (Karras et al. 2022)."""

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        channels: Sequence[int],
        blocks_per_stage: int,
        window_size: int,
        head_dim: int,
        time_dim: int,
        mlp_ratio: float,
        num_classes: int,
        label_dropout: float,
        dropout: float = 0.0,
        sigma_data: float = 0.5,
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        channels = list(channels)
        _validate(image_size, in_channels, channels, blocks_per_stage, window_size, head_dim, time_dim)
        _validate_rest(mlp_ratio, num_classes, label_dropout, dropout, sigma_data, augment_dim)
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.label_dropout = label_dropout  # applied by edm_loss, not by forward
        self.sigma_data = sigma_data
        self.time_dim = time_dim

        self.time_embed = nn.Sequential(
            nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        # Index num_classes is the null label for classifier-free guidance; an unconditional model has none.
        self.label_embed = nn.Embedding(num_classes + 1, time_dim) if num_classes > 0 else None

        block_args = dict(
            time_dim=time_dim,
            head_dim=head_dim,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
        )
        self.tokenizer = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            EncoderStage(channels[max(s - 1, 0)], c, blocks_per_stage, downsample=s > 0, **block_args)
            for s, c in enumerate(channels)
        )
        # Keyed by the encoder stage whose resolution (and skip) it shares; insertion order is execution order.
        self.decoder = nn.ModuleDict(
            {
                str(s): DecoderStage(channels[s + 1], channels[s], blocks_per_stage, **block_args)
                for s in reversed(range(len(channels) - 1))
            }
        )
        self.head = FinalLayer(channels[0], in_channels)
        self._zero_init()
        # EDM's map_augment: the augmentation label (model/augment.py) shifts the noise-level embedding, so the
        # network knows what augmentation it sees; sampling passes none (zero). Built last, so the other
        # layers start as they do without it.
        self.augment_embed = nn.Linear(augment_dim, time_dim, bias=False) if augment_dim > 0 else None

    def _zero_init(self) -> None:
        # Like DiT's adaLN-Zero: every residual branch starts as the identity and the output as zero, so
        # training starts from D(x; σ) = c_skip·x, the optimal denoiser for Gaussian data of std sigma_data.
        layers: list[nn.Module] = [self.head.conv]
        for module in self.modules():
            if isinstance(module, DiffiTBlock):
                layers += [module.attn.proj, module.mlp.fc2]
        for layer in layers:
            for p in layer.parameters():
                nn.init.zeros_(p)

    def network(
        self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """F_θ of EDM: the raw U-shaped transformer on preconditioned input, no skip/scaling."""
        emb = positional_embedding(c_noise, self.time_dim).to(x.dtype)  # (N, T)
        if augment_labels is not None:
            if self.augment_embed is None:
                raise ValueError("augment_labels given to a model without augment_embed (augment_dim=0)")
            emb = emb + self.augment_embed(augment_labels.to(emb.dtype))  # (N, T)
        x_t = self.time_embed(emb)  # (N, T)
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            x_t = x_t + self.label_embed(class_labels)  # (N, T)

        # channels_last memory makes the NCHW <-> (N, H, W, C) permutes around each transformer block free views.
        h = self.tokenizer(x.contiguous(memory_format=torch.channels_last))  # (N, C0, H, W)
        skips = []
        for stage in self.encoder:
            h = stage(h, x_t)  # (N, Cs, H/2^s, W/2^s)
            skips.append(h)
        skips.pop()  # the bottleneck output feeds the decoder directly
        for stage in self.decoder.values():
            h = stage(h, skips.pop(), x_t)  # (N, Cs, H/2^s, W/2^s)
        return self.head(h)  # (N, in_channels, H, W)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:  # fmt: skip
        """EDM denoiser D(x; σ) = c_skip·x + c_out·F(c_in·x, ln(σ)/4, labels, augment_labels); float32 in and
        out. ``augment_labels`` (N, augment_dim) say how each image was augmented; None, as in sampling, is zero."""
        x = x.float()  # (N, C, H, W)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0])  # (N,); a scalar σ applies to the whole batch
        s = sigma.view(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1.0 / (s**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4  # (N,)
        # Run F in the parameters' dtype (bf16 under DeepSpeed), but keep the preconditioning in float32.
        dtype = self.tokenizer.weight.dtype
        extra = () if augment_labels is None else (augment_labels,)  # network's signature stays what it was
        f = self.network((c_in * x).to(dtype), c_noise, class_labels, *extra)
        return c_skip * x + c_out * f.float()  # (N, C, H, W)


#################################################################################
#                              Argument validation                              #
#################################################################################


def _validate(
    image_size: int,
    in_channels: int,
    channels: list[int],
    blocks_per_stage: int,
    window_size: int,
    head_dim: int,
    time_dim: int,
) -> None:
    if not channels:
        raise ValueError("channels must list at least one stage width, got an empty list")
    for name, value in [
        ("image_size", image_size),
        ("in_channels", in_channels),
        ("blocks_per_stage", blocks_per_stage),
        ("window_size", window_size),
        ("head_dim", head_dim),
        ("time_dim", time_dim),
    ]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    bad = [c for c in channels if not isinstance(c, int) or c < 1 or c % head_dim]
    if bad:
        raise ValueError(
            f"every entry of channels must be a positive multiple of head_dim={head_dim}, got {bad}"
        )
    tile = window_size * 2 ** (len(channels) - 1)
    if image_size % tile:
        raise ValueError(
            f"image_size={image_size} must be divisible by window_size * 2**(stages - 1) = "
            f"{window_size} * 2**{len(channels) - 1} = {tile}, so every stage splits into whole windows"
        )
    if time_dim % 2:
        raise ValueError(f"time_dim must be even (cos/sin halves of the noise embedding), got {time_dim}")


def _validate_rest(
    mlp_ratio: float,
    num_classes: int,
    label_dropout: float,
    dropout: float,
    sigma_data: float,
    augment_dim: int,
):
    if mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0 (0 = unconditional), got {num_classes!r}")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if sigma_data <= 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    if not isinstance(augment_dim, int) or augment_dim < 0:
        raise ValueError(f"augment_dim must be an integer >= 0 (0: no augment_embed), got {augment_dim!r}")
