"""The Vision-LSTM classifier and the model registry (``create_model``, ``list_models``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cell import check_mode
from .layers import ConvStem, OffsetLayerNorm, PatchEmbed, PosEmbed2d, ViLBlockPair

POOLINGS = ("bilateral_flatten", "bilateral_avg", "mean")


@dataclass(frozen=True)
class ViLConfig:
    """Constructor arguments of :class:`VisionLSTM`; all plain values, so they fit in JSON/YAML/safetensors metadata."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    dim: int = 192
    depth: int = 12  # number of block pairs
    num_heads: int = 4
    expansion: int = 2
    qkv_block_size: int = 4
    conv_kernel_size: int = 3
    stem: str = "patch"  # "patch": linear patch embedding (ViL); "conv": convolutional tokenizer (hybrid)
    pooling: str = "bilateral_flatten"
    head_norm: bool = True  # LayerNorm on the pooled feature (the official pretrained models have it)
    drop_path_rate: float = 0.0
    mlstm_mode: str = "parallel"  # parallel | chunkwise | recurrent (same math), or "kernels:<mlstm_kernels name>"
    chunk_size: int = 64

    def __post_init__(self):
        size = self.img_size_hw
        if any(s % self.patch_size for s in size):
            raise ValueError(
                f"image size {size[0]}x{size[1]} is not divisible by patch_size {self.patch_size}; "
                f"choose a patch size that divides both sides"
            )
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; expected one of {', '.join(POOLINGS)}")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"unknown stem {self.stem!r}; expected 'patch' or 'conv'")
        check_mode(self.mlstm_mode, "mlstm_mode")
        for name in ("patch_size", "in_chans", "num_classes", "dim", "depth", "num_heads", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if (self.expansion * self.dim) % self.num_heads or (self.expansion * self.dim) % self.qkv_block_size:
            raise ValueError(
                f"inner dim {self.expansion * self.dim} must be divisible by num_heads {self.num_heads} "
                f"and qkv_block_size {self.qkv_block_size}"
            )

    @property
    def img_size_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.img_size_hw
        return h // self.patch_size, w // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        if not isinstance(d["img_size"], int):
            d["img_size"] = list(d["img_size"])
        return d


class VisionLSTM(nn.Module):
    """ViL v2 classifier. (B, C, H, W) images -> (B, num_classes) logits.

    patch embedding + 2D position embedding -> ``depth`` pairs of mLSTM blocks (raster order, then reversed)
    -> LayerNorm -> pooling (first and last token by default) -> optional LayerNorm -> linear head.
    """

    def __init__(self, config: ViLConfig | None = None, **kwargs):
        super().__init__()
        config = replace(config, **kwargs) if config is not None else ViLConfig(**kwargs)
        self.config = config
        c = config
        stem = PatchEmbed if c.stem == "patch" else ConvStem
        self.patch_embed = stem(c.in_chans, c.dim, c.patch_size)
        self.pos_embed = PosEmbed2d(c.grid, c.dim)
        layer_kwargs = dict(expansion=c.expansion, num_heads=c.num_heads, qkv_block_size=c.qkv_block_size,
                            conv_kernel_size=c.conv_kernel_size, mlstm_mode=c.mlstm_mode, chunk_size=c.chunk_size)
        # Drop-path rate is constant over depth, as in the official ViL recipes.
        self.blocks = nn.ModuleList(
            ViLBlockPair(c.dim, drop_path=c.drop_path_rate, **layer_kwargs) for _ in range(c.depth)
        )
        self.norm = OffsetLayerNorm(c.dim, eps=1e-6)
        feature_dim = 2 * c.dim if c.pooling == "bilateral_flatten" else c.dim
        self.head_norm = nn.LayerNorm(feature_dim) if c.head_norm else nn.Identity()
        self.head = nn.Linear(feature_dim, c.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> VisionLSTM:
        """Keep only each block pair's input for backward and recompute the pair's activations there: training
        memory drops to about one pair's activations plus the pair inputs, for one extra forward pass of the
        blocks. Same math and the same gradients (drop-path draws are replayed); only applies while gradients
        are being recorded."""
        self.grad_checkpointing = enable
        return self

    def set_mlstm_mode(self, mode: str, chunk_size: int | None = None) -> "VisionLSTM":
        """Switch every layer to another form of the cell (same weights, same outputs up to rounding)."""
        check_mode(mode, "mlstm_mode")
        self.config = replace(self.config, mlstm_mode=mode, chunk_size=chunk_size or self.config.chunk_size)
        for module in self.modules():
            if hasattr(module, "mlstm_mode"):
                module.mlstm_mode = mode
                module.chunk_size = self.config.chunk_size
        return self

    def use_reference_path(self, enabled: bool = True) -> "VisionLSTM":
        """Run every layer's plain, unfused forward (the benchmark baseline); same weights, same outputs."""
        for module in self.modules():
            if hasattr(module, "reference_path"):
                module.reference_path = enabled
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norm scales."""
        return {"pos_embed.embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, T, D)
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise ValueError(
                f"expected images of shape (B, {self.config.in_chans}, H, W), got {tuple(x.shape)}"
            )
        p = self.config.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by patch_size {p}")
        x = self.pos_embed(self.patch_embed(x))  # (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # raster order
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, (h, w), use_reentrant=False)
            else:
                x = block(x, (h, w))
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, D') with D' = 2D for bilateral_flatten
        if self.config.pooling == "bilateral_flatten":
            return torch.cat([x[:, 0], x[:, -1]], dim=1)
        if self.config.pooling == "bilateral_avg":
            return (x[:, 0] + x[:, -1]) / 2
        return x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.head(self.head_norm(self.pool(self.forward_features(x))))


# ---------------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, dict] = {
    # The official ImageNet-1K sizes (ViL-T/S/B with patch 16 at 224x224).
    "vil_tiny": dict(dim=192),
    "vil_small": dict(dim=384),
    "vil_base": dict(dim=768),
    # Hybrid ViL for 32x32 images (the CIFAR-10 recipe): a convolutional tokenizer (3x3 convs with batch norm,
    # stride 4 to an 8x8 token grid) in place of the linear patch embedding, then 3 pairs of mLSTM blocks at
    # dim 128. 0.80M parameters.
    "vil_hybrid_cifar": dict(img_size=32, num_classes=10, stem="conv", patch_size=4, dim=128, depth=3),
}


def register_model(name: str, **defaults) -> None:
    """Add a named configuration (constructor defaults for :class:`ViLConfig`)."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    ViLConfig(**defaults)  # validate now, not at first use
    _REGISTRY[name] = dict(defaults)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def model_config(name: str, **overrides) -> ViLConfig:
    """The :class:`ViLConfig` of a registered model with ``overrides`` applied."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    valid = {f.name for f in fields(ViLConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown model argument(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    return ViLConfig(**{**_REGISTRY[name], **overrides})


def create_model(name: str, **overrides) -> VisionLSTM:
    """Build a registered model, e.g. ``create_model("vil_tiny", img_size=32, patch_size=4, num_classes=10)``."""
    return VisionLSTM(model_config(name, **overrides))
