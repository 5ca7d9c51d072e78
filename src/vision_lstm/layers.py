"""Building blocks of the Vision-LSTM (ViL v2, Alkin et al. 2024, "Vision-LSTM: xLSTM as Generic Vision Backbone").

Tokens are kept as (B, T, D) in raster order (row by row from the top-left patch) everywhere.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .cell import (ProjectedSources, check_mode, mlstm, mlstm_parallel_projected, mlstm_parallel_reference,
                   projected_form_applies, projected_training_applies)


class OffsetLayerNorm(nn.Module):
    """LayerNorm whose scale is stored as an offset w (effective scale 1 + w), as in the official code.

    Weight decay on w then pulls the scale towards 1, not towards 0.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return F.layer_norm(x, (self.dim,), 1.0 + self.weight, self.bias, self.eps)


class MultiHeadNorm(OffsetLayerNorm):
    """Group norm over each head's channels (one group per head), offset scale. (B, T, H*DH) -> (B, T, H*DH)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # A layer norm over the last axis of a per-head view, then the affine as one fused multiply-add: on the CPU
        # this is 2-2.5x faster forward + backward than a group norm with one group per head (measured for 8192
        # tokens x 256 channels, 4 heads, 2 cores: 3.4-4.3 ms vs 8.5-9.8 ms; 3-9 % of a whole training step).
        # The affine follows the norm's output dtype: fp32 under autocast (which runs layer_norm in fp32), bf16 when
        # called on bf16 outside autocast (the kernel still accumulates the statistics in fp32).
        y = F.layer_norm(x.view(B, T, self.num_heads, C // self.num_heads), (C // self.num_heads,), eps=self.eps)
        return _head_norm_affine(y.view(B, T, C), self.weight, self.bias)


class _GatedHeadNormOutput(torch.autograd.Function):
    """y = (HeadNorm(h) * (1 + w) + b + skip * c) * SiLU(z): the ViL layer's output path, saving only its inputs.

    Autograd would keep four (B, T, inner) intermediates per layer for backward (the normalised h, the sum before
    the gate, SiLU(z) and a relaid copy of h); here the cell's h is read in place, and backward recomputes the other
    three from h, c and z, which the layer keeps anyway (h by the cell, c by the q/k projections): about a fifth of
    a training step's saved activations, for four extra elementwise passes in backward. All elementwise work runs
    in h's dtype (bf16 under autocast); the norm's statistics and the parameter gradients accumulate in fp32
    (the latter are rounded to h's dtype at the end).
    """

    @staticmethod
    def forward(ctx, h, c, z, weight, bias, skip, eps):
        # h: (B, T, H, DH) contiguous; c, z: (B, T, H * DH) in h's dtype; weight, bias (or None), skip: (H * DH,)
        B, T, H, DH = h.shape
        dtype = h.dtype
        normed = F.layer_norm(h, (DH,), eps=eps)  # statistics in fp32 for bf16 h
        y = _head_norm_affine(normed.view(B, T, H * DH), weight, bias)
        y.addcmul_(skip.to(dtype), c)
        ctx.save_for_backward(h, c, z, weight, bias, skip)
        ctx.eps = eps
        return y.mul_(F.silu(z))  # (B, T, H * DH)

    @staticmethod
    def backward(ctx, grad_y):
        h, c, z, weight, bias, skip = ctx.saved_tensors
        B, T, H, DH = h.shape
        dtype = h.dtype
        grad_y = grad_y.contiguous()
        normed, mean, rstd = torch.native_layer_norm(h, (DH,), None, None, ctx.eps)  # as in forward, with its stats
        normed = normed.view(B, T, H * DH)
        pre_gate = _head_norm_affine(normed, weight, bias).addcmul_(skip.to(dtype), c)
        grad_z = torch.ops.aten.silu_backward(grad_y * pre_gate, z)  # d/dz of pre_gate * SiLU(z)
        del pre_gate
        grad_pre = grad_y.mul_(F.silu(z))  # (B, T, H * DH); grad_y is not needed any more
        rows = grad_pre.view(-1, H * DH)
        # Column sums in rows' dtype: the reduction accumulates in fp32 and rounds only the result, as the bf16
        # products of autocast's linear layers round their weight gradients. Asking for an fp32 result instead
        # (sum(dtype=fp32)) first copies the whole (B * T, H * DH) operand to fp32: three such copies per layer
        # were 4 % of a ViL-T bf16 training step (profile, 2 cores, session 17).
        grad_skip = (rows * c.view(-1, H * DH)).sum(0)
        grad_weight = (rows * normed.view(-1, H * DH)).sum(0)
        grad_bias = rows.sum(0) if bias is not None else None
        grad_c = grad_pre * skip.to(dtype)
        grad_normed = grad_pre.mul_((1.0 + weight).to(dtype)).view(B, T, H, DH)
        grad_h = torch.ops.aten.native_layer_norm_backward(grad_normed, h, (DH,), mean, rstd, None, None,
                                                            (True, False, False))[0]
        return grad_h, grad_c, grad_z, grad_weight.to(weight.dtype), \
            grad_bias.to(bias.dtype) if bias is not None else None, grad_skip.to(skip.dtype), None


def _head_norm_affine(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """normed * (1 + weight) + bias in normed's dtype: the offset scale of :class:`MultiHeadNorm`."""
    scale = (1.0 + weight).to(normed.dtype)
    return torch.addcmul(bias.to(normed.dtype), normed, scale) if bias is not None else normed * scale


class _GatedHeadNormKernel(torch.autograd.Function):
    """:class:`_GatedHeadNormOutput` as the CPU kernels (``csrc/layer_cpu.cpp``): one pass forward, one backward.

    Same math; everything between loading the inputs and storing the outputs in fp32 (one rounding per output), the
    norm's statistics kept from forward (B * T * H floats) instead of computed again, the parameter gradients summed
    in fp32. Saves the same tensors as the PyTorch route (h, c, z).
    """

    @staticmethod
    def forward(ctx, h, c, z, kernels, weight, bias, skip, eps, z_bias):
        # h: (B, T, H, DH) contiguous; c, z: (B, T, H * DH) with unit last strides, h's dtype; z_bias: (H * DH,),
        # added to z in fp32, or None
        out = torch.empty(c.shape, dtype=h.dtype)
        mean, rstd = kernels.gated_norm_forward(h, c, z, weight, bias, skip, eps, out, z_bias)
        ctx.save_for_backward(h, c, z, weight, bias, skip, mean, rstd, z_bias)
        ctx.kernels = kernels
        return out  # (B, T, H * DH)

    @staticmethod
    def backward(ctx, grad_y):
        h, c, z, weight, bias, skip, mean, rstd, z_bias = ctx.saved_tensors
        grad_y = grad_y.to(h.dtype)
        grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
        grad_h, grad_c, grad_z, grad_w, grad_b, grad_skip, grad_z_bias = ctx.kernels.gated_norm_backward(
            grad_y, h, c, z, weight, bias, skip, mean, rstd, z_bias)
        return grad_h, grad_c, grad_z, None, grad_w.to(weight.dtype), \
            grad_b.to(bias.dtype) if bias is not None else None, grad_skip.to(skip.dtype), None, \
            grad_z_bias.to(z_bias.dtype) if z_bias is not None else None


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a stage computes t's products in: autocast's low dtype where autocast is on for t's device, else
    t's own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def layer_kernels(t: torch.Tensor, dtype: torch.dtype):
    """The CPU kernels' operators (``fused.ops()``) for a layer stage on t computed in dtype, or None: then the
    layer takes PyTorch's route (another device or dtype, kernels off or unbuilt, or inside ``torch.compile``, which
    cannot trace through them)."""
    if torch.compiler.is_compiling() or t.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    return fused.ops()


@functools.cache
def _bias_fused_linear_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN's linear with the bias fused (``torch.ops.mkldnn._linear_pointwise``, the op inductor emits
    for CPU linears; private, so probed) is here and gives addmm's bits on probes in dtype (fp32, where addmm is
    MKL's: also at ViL-T's widths, whose sums a library could split otherwise)."""
    shapes = [(37, 48, 24)] + ([(64, 192, 384), (64, 384, 192)] if dtype == torch.float32 else [])
    try:
        generator = torch.Generator().manual_seed(0)
        for n, k, m in shapes:
            x, w, b = (torch.randn(shape, generator=generator).to(dtype) for shape in ((n, k), (m, k), (m,)))
            if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), torch.addmm(b, x, w.t())):
                return False
        return True
    except (AttributeError, RuntimeError):
        return False


# fp32 takes the fused route from this many rows on: below it MKL's addmm may take another path (one row: a
# matrix-vector product, other bits), and the pass it saves is small there anyway
_FP32_FUSED_MIN_ROWS = 32


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                fuse_fp32: bool = False) -> torch.Tensor:
    """x W^T + b for x (N, K), W (M, K), b (M,) or None, all one dtype; not differentiable through the fast route
    (call it without gradients or inside an autograd function). On the CPU, in bf16 and (fuse_fp32, from
    _FP32_FUSED_MIN_ROWS rows) in fp32, it runs oneDNN's linear with the bias fused: addmm (F.linear) first writes
    the bias over its whole (N, M) output and then accumulates the product into it, one more pass over that output
    (8192 x 192 -> 384: 0.45 against 0.59 ms, bf16, 2 cores of a Xeon with AMX, session 29, ad hoc; in fp32 that
    pass was the copies taking 7 % of a ViL-T inference, session 36: inference only, since in training steps it
    measured 0.89-0.96x on the MNIST and ViL-T models, unexplained). The same bits as addmm (bf16: both are oneDNN's
    product; fp32: oneDNN's and MKL's sums agree at these shapes; probed at first use, pinned in
    tests/test_model.py)."""
    fused_dtype = x.dtype == torch.bfloat16 or (fuse_fp32 and x.dtype == torch.float32
                                                and x.shape[0] >= _FP32_FUSED_MIN_ROWS)
    if (bias is not None and fused_dtype and x.device.type == "cpu" and weight.dtype == bias.dtype == x.dtype
            and not torch.compiler.is_compiling() and _bias_fused_linear_works(x.dtype)):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def gated_head_norm_output(h: torch.Tensor, c: torch.Tensor, z: torch.Tensor, norm: "MultiHeadNorm",
                           skip: torch.Tensor, z_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(norm(h) + skip * c) * SiLU(z + z_bias) for h (B, T, H, DH), c, z (B, T, H * DH) and z_bias (H * DH,) or
    None, in h's dtype. -> (B, T, H * DH).

    The CPU kernels where they apply (:class:`_GatedHeadNormKernel`, which adds z_bias in fp32 as it reads z), else
    PyTorch's route (z_bias added first)."""
    B, T, H, DH = h.shape
    if H != norm.num_heads or H * DH != norm.dim:
        raise ValueError(f"h has shape {tuple(h.shape)}, expected (B, T, {norm.num_heads}, "
                         f"{norm.dim // norm.num_heads}) for this norm")
    h, c, z = h.contiguous(), c.to(h.dtype), z.to(h.dtype)
    kernels = layer_kernels(h, h.dtype)
    if kernels is not None and c.stride(-1) == 1 and z.stride(-1) == 1:
        return _GatedHeadNormKernel.apply(h, c, z, kernels, norm.weight, norm.bias, skip, norm.eps, z_bias)
    if z_bias is not None:
        z = z + z_bias.to(z.dtype)
    return _GatedHeadNormOutput.apply(h, c, z, norm.weight, norm.bias, skip, norm.eps)


class _ConvSiLUKernel(torch.autograd.Function):
    """SiLU(depthwise conv of the token grid + bias) as the CPU kernels (``csrc/layer_cpu.cpp``): one pass forward,
    one backward (the convolution again, SiLU's gradient, the input, weight and bias gradients), where PyTorch runs
    oneDNN's convolution and SiLU and in backward SiLU's gradient and two convolution kernels. Products in fp32 with
    the fp32 weights (autocast would round them to bf16), one rounding per output; saves only the input."""

    @staticmethod
    def forward(ctx, x, kernels, height, width, weight, bias):
        # x: (B, T, C) contiguous, T = height * width in raster order; weight (C, 1, k, k); bias (C,) or None
        out = torch.empty_like(x)
        kernels.conv_silu_forward(x, height, width, weight, bias, out)
        ctx.save_for_backward(x, weight, bias)
        ctx.kernels, ctx.grid = kernels, (height, width)
        return out  # (B, T, C)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        grad_x, grad_w, grad_b = _conv_silu_backward(ctx.kernels, grad_out, x, ctx.grid, weight, bias)
        return grad_x, None, None, None, grad_w, grad_b


def _conv_silu_backward(kernels, grad_out, x, grid, weight, bias):
    """The gradients of SiLU(conv(x)) through the CPU kernel: x's (x's dtype), the weight's and bias's (their dtypes;
    None without a bias)."""
    grad_x, grad_w, grad_b = kernels.conv_silu_backward(grad_out.to(x.dtype).contiguous(), x, *grid, weight, bias)
    return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype) if bias is not None else None


_KERNEL_CONV_SIZES = (1, 3, 5, 7)


def _grouped_pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x: (N, nb * bs_in) contiguous; weight: (nb, bs_out, bs_in) -> (N, nb * bs_out).

    A grouped 1x1 convolution over a channels-last view of x: no layout copies in or out, and oneDNN's grouped
    kernels beat both a batched matmul over the tiny blocks and a dense (dim x dim) matrix (which would cost
    dim / block_size times the FLOPs). All tokens form one 1 x N "image": oneDNN is several times faster on a long
    spatial axis than on N images of 1 x 1 pixels (measured: 1.8 ms vs 7.3 ms forward + backward for 6272 tokens
    x 128 channels on 2 cores). The bias goes into the convolution: one pass over the output instead of two.
    """
    nb, bs_out, bs_in = weight.shape
    x4 = x.view(1, 1, -1, nb * bs_in).permute(0, 3, 1, 2)  # (1, C, 1, N), channels-last strides
    y = F.conv2d(x4, weight.reshape(nb * bs_out, bs_in, 1, 1), bias, groups=nb)
    return y.permute(0, 2, 3, 1).reshape(-1, nb * bs_out)


def _super_block_size(channels: int, block_size: int, group: int = 32) -> int:
    """The largest multiple of ``block_size`` that is at most ``group`` (and at least block_size) and divides
    ``channels``: the width of the super-blocks that the block-diagonal products are computed in."""
    return max(g for g in range(block_size, max(min(group, channels), block_size) + 1, block_size)
               if channels % g == 0)


def _super_blocks(weight: torch.Tensor, group: int) -> torch.Tensor:
    """(nb, bs, bs) blocks -> (nb * bs / group, group, group): the same block-diagonal matrix, cut into wider
    diagonal blocks of ``group`` channels (the small blocks on their diagonals, zeros elsewhere).

    Forward plus input gradient measured 1.5-2.5x faster with 32-channel super-blocks than with the 4-channel
    blocks themselves, in fp32 and bf16, for 6272-8192 tokens x 128-384 channels on 2 cores (session 16, Intel),
    although they make 8x the multiply-adds. Our reading, not traced: oneDNN's grouped convolution vectorises over
    the channels of a group, so 4-channel groups leave most vector lanes idle. The zeros are exact, so the result is
    the block-diagonal product up to the order of the additions.
    """
    nb, bs, _ = weight.shape
    k = group // bs  # small blocks per super-block
    out = weight.new_zeros(nb // k, k, bs, k, bs)
    out.diagonal(dim1=1, dim2=3).copy_(weight.view(nb // k, k, bs, bs).permute(0, 2, 3, 1))  # [G, r, o, r, i]
    return out.view(nb // k, group, group)


def _conv_group(t: torch.Tensor) -> int:
    """The super-block width for the block-diagonal forward and input-gradient convolutions on t's device.

    oneDNN picks different grouped-convolution kernels on different CPUs, and the best width follows. 32 channels on
    CPUs with AMX (session 16, an Intel Xeon: 1.5-2.5x faster than the 4-channel blocks themselves), and on GPUs. 8
    on other CPUs: on the AMD Zen 4 machine (session 19, forward + input gradient, 2 cores, median of 30, ad hoc)
    8 was the fastest width in every case and 32 no faster than the blocks themselves: bf16 8192 tokens x 384
    channels 1.06-1.15 ms at 8 against 2.41-2.49 at 32 and 2.04-2.30 at 4; 6272 x 128 0.25-0.37 against 0.41-0.42;
    fp32 8192 x 384 4.43-5.1 against 5.27-6.18, 6272 x 128 0.46-0.81 against 0.83-0.96.
    """
    if t.device.type == "cpu" and not _cpu_has_amx():
        return 8
    return 32


def _outer_sum_group(t: torch.Tensor) -> int:
    """The super-block width for :func:`_block_outer_sum` on t's dtype and device.

    32 channels, except for 2-byte dtypes (bf16) on a CPU with AMX tile units: there 128-channel products (4x the
    multiply-adds of 32) took about half the time (0.38-0.48 vs 0.90-1.06 ms for 6272 tokens x 128 channels, 2.5-3.5
    vs 4.1-6.9 ms for 8192 x 384; bf16, 2 cores of an Intel Xeon with AMX, session 18, ad hoc). Our reading, not
    traced: AMX multiplies 16 x 32 bf16 tiles, so a 32 x 32 product is mostly call overhead, and 4x fewer, wider
    products cost less in all. Without AMX (the AMD Zen 4 machine 32 was chosen on, session 6) nothing changes.
    """
    if t.device.type == "cpu" and t.element_size() == 2 and _cpu_has_amx():
        return 128
    return 32


def _cpu_has_amx() -> bool:
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent -> no AMX
    return bool(is_supported()) if is_supported is not None else False


def _block_outer_sum(a: torch.Tensor, b: torch.Tensor, block_size: int, group: int = 32) -> torch.Tensor:
    """sum_n a[n, j*bs + o] b[n, j*bs + i] for every block j: the weight gradient of a block-diagonal product.

    a: (N, C), b: (N, C) contiguous -> (C / bs, bs, bs). One matmul per super-block of ``group`` channels (the
    diagonal bs x bs blocks of each group x group product are kept): group / bs times the FLOPs of the blocks
    alone, but a matmul with a long inner axis. Each operand is a column slice of the token-major tensor, which
    BLAS reads in place (a transposed operand with leading dimension C); a single batched matmul over all groups
    would first copy both operands into a group-major layout, and those copies cost more than the products.
    """
    C = a.shape[1]
    group = _super_block_size(C, block_size, group)
    k = group // block_size
    out = a.new_empty(C // block_size, block_size, block_size)
    for start in range(0, C, group):
        full = a[:, start:start + group].t() @ b[:, start:start + group]  # (group, group)
        blocks = full.view(k, block_size, k, block_size).diagonal(dim1=0, dim2=2)  # (bs, bs, k)
        out[start // block_size:(start + group) // block_size] = blocks.permute(2, 0, 1)
    return out


class _BlockDiagonalMatmul(torch.autograd.Function):
    """Forward as a grouped 1x1 convolution over super-blocks of 8 or 32 channels (:func:`_super_blocks`,
    :func:`_conv_group`); backward by hand: the input gradient is the same convolution with each block transposed,
    and the weight gradient one matmul per super-block (:func:`_block_outer_sum`) instead of oneDNN's
    grouped-convolution backward, the largest single cost in a profile of a ViL-T bf16 training step at batch 128."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # (N, C_in), (nb, bs_out, bs_in), (C_out,) or None -> (N, C_out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        nb, bs_out, bs_in = weight.shape
        square = bs_out == bs_in
        # rectangular blocks stay as they are (no super-blocks: nothing in the model uses them)
        wide = _super_blocks(weight, _super_block_size(nb * bs_in, bs_in, _conv_group(x))) if square else weight
        ctx.wide = wide
        return _grouped_pointwise_conv(x, wide, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_pointwise_conv(grad_y, ctx.wide.transpose(1, 2), None)
        if ctx.needs_input_grad[1]:
            if weight.shape[1] == weight.shape[2]:
                grad_w = _block_outer_sum(grad_y, x, weight.shape[1], _outer_sum_group(x))
            else:  # rectangular blocks: the plain per-block sum
                nb, bs_out, bs_in = weight.shape
                grad_w = torch.einsum("nbo,nbi->boi", grad_y.view(-1, nb, bs_out), x.view(-1, nb, bs_in))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum(0)
        return grad_x, grad_w, grad_b


def block_diagonal_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., b, o] = sum_i x[..., b, i] W[b, o, i] (+ bias[b * bs_out + o]).

    x: (..., nb * bs_in); weight: (nb, bs_out, bs_in); bias: (nb * bs_out,) or None. Under autocast the product
    runs in the autocast dtype, as ``nn.Linear`` would.
    """
    nb, bs_out, bs_in = weight.shape
    lead = x.shape[:-1]
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    y = _BlockDiagonalMatmul.apply(x.reshape(-1, nb * bs_in).contiguous(), weight, bias)
    return y.view(*lead, nb * bs_out)


_KERNEL_BLOCK_SIZES = (1, 2, 4, 8, 16)


def _block_kernels(t: torch.Tensor, dtype: torch.dtype, block_size: int):
    """:func:`layer_kernels` for block-diagonal products of ``block_size`` on t, or None: also where the blocks are
    wider than the kernels' vectors (16 channels need AVX-512: :func:`fused.vector_lanes`)."""
    kernels = layer_kernels(t, dtype) if block_size in _KERNEL_BLOCK_SIZES else None
    return kernels if kernels is not None and block_size <= fused.vector_lanes() else None


def _project_heads(kernels, c: torch.Tensor, x_m: torch.Tensor, num_heads: int, weights, biases):
    """q, k (from c) and v (from x_m) written head-major by the block-diagonal kernels, one pass each.
    c, x_m: (B, T, H * DH) contiguous, one dtype; weights, biases in that dtype -> three (B, H, T, DH) tensors."""
    B, T, inner = c.shape
    H = num_heads
    DH = inner // H
    outs = tuple(torch.empty(B, H, T, DH, dtype=c.dtype) for _ in range(3))
    for source, weight, bias, out in zip((c, c, x_m), weights, biases, outs):
        kernels.block_diag_mm([source.view(B, T, H, DH)], [weight], bias, out.transpose(1, 2))
    return outs


def _head_token_views(grads, dtype):
    """(B, H, T, DH) gradients (or None) -> (B, T, H, DH) views in dtype with unit last strides, for the kernels."""
    def view(grad):
        grad = grad.to(dtype)
        return (grad if grad.stride(-1) == 1 else grad.contiguous()).transpose(1, 2)
    return tuple(None if g is None else view(g) for g in grads)


def _head_input_grad(kernels, grads, weights, like: torch.Tensor, addend=None, in_place: bool = False):
    """sum_j W_j^T grads_j (+ addend): the gradient of the source (like: (B, T, H * DH)) of the products with the
    weights W_j, from their gradients' token views (None: no gradient). The addend, a gradient of the same source
    from elsewhere, is summed in by the same pass instead of by autograd in one of its own; it is overwritten with
    the sum when in_place (the caller made it), else left as it is. None when there is nothing to sum."""
    pairs = [(g, w.transpose(1, 2)) for g, w in zip(grads, weights) if g is not None]
    if not pairs:
        return addend
    B, T, H, DH = pairs[0][0].shape
    if addend is not None and (addend.dtype != like.dtype or not addend.is_contiguous()):
        addend, in_place = addend.to(like.dtype, memory_format=torch.contiguous_format), True  # a copy made here
    out = addend if in_place and addend is not None else torch.empty_like(like)
    kernels.block_diag_mm([g for g, _ in pairs], [w for _, w in pairs], None, out.view(B, T, H, DH),
                          None if addend is None else addend.view(B, T, H, DH))
    return out


def _head_param_grads(kernels, grads, sources, block_size: int, has_bias, needs, gate_grad=None):
    """The weight and bias gradients (fp32; None where not needed or without a bias) of the three products, from
    their gradients' token views and their sources (c, c, x_m); and with gate_grad (B * T, G), the gates' gradient,
    also g^T c (G, H * DH) fp32, summed by the pass for q's weights, which reads c anyway (None if that pass does
    not run)."""
    param_grads, grad_gate = [], None
    for i, (grad, source) in enumerate(zip(grads, sources)):
        grad_w = grad_b = None
        if grad is not None and (needs[2 * i] or needs[2 * i + 1]):
            B, T, H, DH = grad.shape
            gates = gate_grad if i == 0 else None
            grad_w, grad_b, grad_g = kernels.block_diag_outer(grad, source.view(B, T, H, DH), block_size,
                                                              gates)  # fp32
            grad_b = grad_b if has_bias[i] else None
            grad_gate = grad_g if gates is not None else grad_gate
        param_grads += [grad_w, grad_b]
    return param_grads, grad_gate


class _HeadMajorProjections(torch.autograd.Function):
    """q = Wq c + bq, k = Wk c + bk, v = Wv x_m + bv (block-diagonal W, :class:`BlockDiagonalLinear`) written
    straight into head-major (B, H, T, DH) memory by the CPU kernels (``csrc/blockdiag_cpu.cpp``), one pass each.

    Against the PyTorch route (super-block convolutions on token-major memory, per-super-block matmuls for the
    weight gradients) this drops the cell's copies of q, k and v into head-major memory (forward and when backward
    rebuilds them) and of their gradients back, and computes c's gradient from q's and k's in one pass. Same math:
    the products in the inputs' dtype (under autocast the low dtype, weights rounded to it as autocast would),
    summed in fp32 and rounded once; the weight and bias gradients are summed in fp32 and returned in fp32.
    """

    @staticmethod
    def forward(ctx, c, x_m, kernels, num_heads, wq, bq, wk, bk, wv, bv):
        # c, x_m: (B, T, H * DH) contiguous, one dtype; kernels: fused.ops(); w*: (H * DH / bs, bs, bs);
        # b*: (H * DH,) or None
        dtype = c.dtype
        weights = tuple(w.to(dtype) for w in (wq, wk, wv))
        biases = tuple(b.to(dtype) if b is not None else None for b in (bq, bk, bv))
        ctx.save_for_backward(c, x_m, *weights)
        ctx.kernels, ctx.num_heads = kernels, num_heads
        ctx.has_bias = tuple(b is not None for b in biases)
        return _project_heads(kernels, c, x_m, num_heads, weights, biases)  # (B, H, T, DH) each, contiguous

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        c, x_m, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _head_token_views((grad_q, grad_k, grad_v), c.dtype)
        grad_c = _head_input_grad(ctx.kernels, grads[:2], weights[:2], c) if needs[0] else None  # q and k: one pass
        grad_x_m = _head_input_grad(ctx.kernels, grads[2:], weights[2:], x_m) if needs[1] else None
        param_grads, _ = _head_param_grads(ctx.kernels, grads, (c, c, x_m), weights[0].shape[-1], ctx.has_bias,
                                           needs[4:])
        return (grad_c, grad_x_m, None, None, *param_grads)


class _UpProjections(torch.autograd.Function):
    """The layer's products of its input x: x_m = x W_m^T + b_m, z = x W_z^T + b_z and the gates' part from x,
    x W_g^T + b_g, as one autograd node. As separate linears (or one split in three) autograd would add their input
    gradients in a (B, T, D) pass of its own (and concatenate a split's gradients first); here the products
    accumulate x's gradient themselves (addmm into one output). Products in x's dtype (under autocast its low
    dtype; the weights rounded to it, as autocast would), summed in fp32 by the matrix products; weight and bias
    gradients returned in the parameters' dtypes, the bias gradients summed in fp32 (by the CPU kernels'
    column_sums where they apply: about twice as fast as PyTorch's sum over the rows of a bf16 gradient)."""

    @staticmethod
    def forward(ctx, x, inference, *weights_and_biases):
        # x: (B, T, D); inference: called without gradients; weights_and_biases: W_m, b_m, W_z, b_z, W_g, b_g with
        # W (out, D), b (out,) or None
        rows = x.reshape(-1, x.shape[-1])
        used = [None if t is None else t.to(x.dtype) for t in weights_and_biases]
        outs = tuple(linear_rows(rows, w, b, fuse_fp32=inference).view(*x.shape[:-1], -1)
                     for w, b in zip(used[0::2], used[1::2]))
        ctx.save_for_backward(x, *used[0::2])
        ctx.dtypes = [None if t is None else t.dtype for t in weights_and_biases]
        return outs  # (B, T, out) each

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        kernels = layer_kernels(rows, rows.dtype)
        grad_x, param_grads = None, []
        for i, (grad, weight) in enumerate(zip(grads, weights)):
            if grad is None:
                param_grads += [None, None]
                continue
            grad = grad.to(x.dtype).reshape(-1, weight.shape[0])
            if ctx.needs_input_grad[0]:
                grad_x = grad @ weight if grad_x is None else grad_x.addmm_(grad, weight)
            # (inputs: x, inference, then each product's weight and bias)
            grad_w = (grad.t() @ rows).to(ctx.dtypes[2 * i]) if ctx.needs_input_grad[2 + 2 * i] else None
            grad_b = None
            if ctx.needs_input_grad[3 + 2 * i]:
                grad_b = kernels.column_sums(grad) if kernels is not None and grad.is_contiguous() else \
                    grad.sum(0, dtype=torch.float32)
                grad_b = grad_b.to(ctx.dtypes[2 * i + 1])
            param_grads += [grad_w, grad_b]
        return (None if grad_x is None else grad_x.view(x.shape), None, *param_grads)


class _DownProjection(torch.autograd.Function):
    """out = y W^T + b, the layer's last product, as one autograd node over the CPU kernels: forward with the bias
    fused into the product (:func:`linear_rows`), backward with the bias's gradient summed in fp32 by the kernels'
    column_sums. As ``nn.Linear`` under autocast, autograd adds a node for each of the weight's and bias's casts and
    sums the bias's gradient in a pass of PyTorch's (about twice as slow on a bf16 gradient). Products in y's dtype
    (the weight and bias rounded to it, as autocast would); weight and bias gradients in the parameters' dtypes."""

    @staticmethod
    def forward(ctx, y, kernels, weight, bias):
        # y: (B, T, inner); weight (D, inner); bias (D,) or None
        rows = y.reshape(-1, y.shape[-1])
        used_w = weight.to(y.dtype)
        used_b = None if bias is None else bias.to(y.dtype)
        ctx.save_for_backward(rows, used_w)
        ctx.kernels, ctx.shape = kernels, y.shape
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return linear_rows(rows, used_w, used_b).view(*y.shape[:-1], -1)  # (B, T, D)

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad = grad.to(rows.dtype).reshape(-1, weight.shape[0]).contiguous()
        grad_y = (grad @ weight).view(ctx.shape) if needs[0] else None
        grad_w = (grad.t() @ rows).to(ctx.dtypes[0]) if needs[2] else None
        grad_b = ctx.kernels.column_sums(grad).to(ctx.dtypes[1]) if needs[3] else None
        return grad_y, None, grad_w, grad_b


class _ConvHeadProjections(torch.autograd.Function):
    """c = SiLU(conv(x_m)) (:class:`_ConvSiLUKernel`), c's part of the gates, c @ gate_c^T (summed by the conv's
    kernel as it writes c), and q, k, v head-major (:class:`_HeadMajorProjections`) as one autograd node over the
    CPU kernels.

    c feeds the q, k and gate products and the output path's skip, x_m the conv and v. As separate nodes, autograd
    sums their gradients in passes of their own: three additions of a (B, T, inner) tensor per layer, each reading
    two and writing one, from memory that has left the cache by then (a visible share of a training step in a perf
    profile on a 2-core Xeon with AMX, session 27). Here the skip's gradient of c is the addend of the pass that
    computes q's and k's (block_diag_mm), the gates' product accumulates into that sum in place (addmm_; an addmm
    with the addend as its input would first copy it), and v's gradient goes into the conv's input gradient the same
    way; the gates' weight gradient on c is summed by the pass for q's weights (block_diag_outer, session 32), which
    reads c anyway. Same math as the separate nodes, fewer roundings of the partial sums.
    """

    @staticmethod
    def forward(ctx, x_m, kernels, height, width, conv_w, conv_b, gate_c, num_heads, heads, outbox, wq, bq, wk, bk, wv,
                bv):
        # x_m: (B, T, inner) contiguous, T = height * width in the layer's order; conv_w (inner, 1, k, k); gate_c
        # (2H, inner); w*: (inner / bs, bs, bs); b*: (inner,) or None. Products in x_m's dtype. heads=False: q, k, v
        # are placeholders (one element expanded to their shape) for a cell that computes them from c and x_m;
        # outbox: None, or the cell's ProjectedSources.outbox (then the cell may take the projections' backward).
        dtype = x_m.dtype
        c = torch.empty_like(x_m)
        gate_c_used = gate_c.to(dtype)
        # c's part of the gates summed by the conv's kernel as it writes c (B, T, 2H): a product of its own would
        # read c back from memory for 2H outputs a token
        gates_c = kernels.conv_silu_forward(x_m, height, width, conv_w, conv_b, c, gate_c_used)
        weights = tuple(w.to(dtype) for w in (wq, wk, wv))
        biases = tuple(b.to(dtype) if b is not None else None for b in (bq, bk, bv))
        ctx.save_for_backward(x_m, c, conv_w, conv_b, gate_c_used, *weights)
        ctx.kernels, ctx.grid, ctx.num_heads, ctx.outbox = kernels, (height, width), num_heads, outbox
        # An output that gets no gradient (k's, when the cell's backward took the projections': it returns c's
        # gradient through q and k as q's) comes to backward as None, not as zeros autograd would first write over
        # its whole (B, H, T, DH) shape: backward takes None for any of them.
        ctx.set_materialize_grads(False)
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.gate_dtype = gate_c.dtype
        if not heads:
            B, T, inner = c.shape
            return (c, gates_c, *(torch.zeros((), dtype=dtype).expand(B, num_heads, T, inner // num_heads)
                                  for _ in range(3)))
        return (c, gates_c, *_project_heads(kernels, c, x_m, num_heads, weights, biases))

    @staticmethod
    def backward(ctx, grad_c, grad_gates, grad_q, grad_k, grad_v):
        x_m, c, conv_w, conv_b, gate_c, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        B, T, inner = c.shape
        projection_grads = ctx.outbox.pop("projection_grads", None) if ctx.outbox is not None else None
        ctx.outbox = None
        if projection_grads is not None:
            return _ConvHeadProjections._backward_after_cell(ctx, (x_m, c, conv_w, conv_b, gate_c), grad_c,
                                                             grad_gates, grad_q, grad_v, projection_grads)
        grads = _head_token_views((grad_q, grad_k, grad_v), c.dtype)
        skip_grad = grad_c
        grad_c = _head_input_grad(ctx.kernels, grads[:2], weights[:2], c, skip_grad)  # q's and k's + the skip's
        if grad_gates is not None:  # + c's gradient through the gates
            grad_gates = grad_gates.to(c.dtype).reshape(B * T, -1)
            if grad_c is None:
                grad_c = (grad_gates @ gate_c).view(B, T, inner)
            elif grad_c is skip_grad:  # (no q or k gradient) not ours to write into
                grad_c = torch.addmm(grad_c.to(c.dtype).reshape(B * T, inner), grad_gates, gate_c).view(B, T, inner)
            else:  # accumulated in place: addmm(addend, ...) would first copy the addend into a new output
                grad_c.view(B * T, inner).addmm_(grad_gates, gate_c)
        grad_x_m = grad_w = grad_b = None
        if grad_c is not None:
            grad_x_m, grad_w, grad_b = _conv_silu_backward(ctx.kernels, grad_c, x_m, ctx.grid, conv_w, conv_b)
        grad_x_m = _head_input_grad(ctx.kernels, grads[2:], weights[2:], x_m, grad_x_m, True)  # + v's, one pass
        gate_grad = grad_gates if grad_gates is not None and needs[6] else None
        param_grads, grad_gate_c = _head_param_grads(ctx.kernels, grads, (c, c, x_m), weights[0].shape[-1],
                                                     ctx.has_bias, needs[10:], gate_grad)
        if gate_grad is not None:
            if grad_gate_c is None:  # q's weight pass did not run
                grad_gate_c = grad_gates.t() @ c.view(B * T, inner)
            grad_gate_c = grad_gate_c.to(ctx.gate_dtype)
        return (grad_x_m, None, None, None, grad_w, grad_b, grad_gate_c, None, None, None, *param_grads)

    @staticmethod
    def _backward_after_cell(ctx, saved, skip_grad, grad_gates, grad_c_qk, grad_x_v, projection_grads):
        """backward where the cell's kernel took the projections' backward (cell.ProjectedSources.outbox): grad_c_qk,
        grad_x_v are c's gradient through q and k and x_m's through v ((B, H, T, DH) views of token-major memory, or
        None), projection_grads the weights' and biases' gradients. The conv's backward sums c's whole gradient
        (those, the skip's and the gates' product's) and x_m's (v's added) as it goes, and the gates' weight
        gradient on c: no pass over (B, T, inner) memory of its own for any of them. saved: x_m, c, conv_w,
        conv_b, gate_c from ctx.saved_tensors (which backward has unpacked: checkpointing allows that once)."""
        x_m, c, conv_w, conv_b, gate_c = saved
        needs = ctx.needs_input_grad
        B, T, inner = c.shape

        def token_major(grad):  # (B, H, T, DH) view of (B, T, inner) memory -> that memory, or None
            return None if grad is None else grad.transpose(1, 2).reshape(B, T, inner).to(c.dtype).contiguous()

        grads_c = [g for g in (token_major(grad_c_qk), skip_grad) if g is not None] or [torch.zeros_like(c)]
        if grad_gates is not None:
            grad_gates = grad_gates.to(c.dtype).contiguous()
        first = grads_c[0].to(c.dtype).contiguous()
        more = grads_c[1].to(c.dtype).contiguous() if len(grads_c) > 1 else None
        grad_x_m, grad_w, grad_b, grad_gate_c = ctx.kernels.conv_silu_backward_summed(
            first, x_m, *ctx.grid, conv_w, conv_b, more, grad_gates, None if grad_gates is None else gate_c,
            token_major(grad_x_v))
        grad_w = grad_w.to(conv_w.dtype)
        grad_b = grad_b.to(conv_b.dtype) if conv_b is not None else None
        grad_gate_c = grad_gate_c.to(ctx.gate_dtype) if grad_gates is not None and needs[6] else None
        exists = (True, ctx.has_bias[0], True, ctx.has_bias[1], True, ctx.has_bias[2])  # (wq, bq, wk, bk, wv, bv)
        param_grads = [grad if has and need else None for grad, has, need in zip(projection_grads, exists, needs[10:])]
        return (grad_x_m, None, None, None, grad_w, grad_b, grad_gate_c, None, None, None, *param_grads)


def head_major_projections(c: torch.Tensor, x_m: torch.Tensor, num_heads: int, q_proj: "BlockDiagonalLinear",
                           k_proj: "BlockDiagonalLinear", v_proj: "BlockDiagonalLinear"):
    """q_proj(c), k_proj(c), v_proj(x_m) as head-major (B, H, T, DH) tensors, from c, x_m (B, T, H * DH).

    Through the CPU kernels (:class:`_HeadMajorProjections`) where they apply, else None: then the caller takes
    PyTorch's route. Under autocast the products run in its dtype, as ``nn.Linear``'s would. Inside
    ``torch.compile`` PyTorch's route is taken too (the compiler cannot trace through the kernels)."""
    dtype = compute_dtype(c)
    B, T, inner = c.shape
    bs = q_proj.block_size
    usable = (inner % num_heads == 0 and (inner // num_heads) % bs == 0
              and x_m.shape == c.shape and all(p.block_size == bs for p in (k_proj, v_proj)))
    kernels = _block_kernels(c, dtype, bs) if usable else None
    if kernels is None:
        return None
    c, x_m = (t.to(dtype).contiguous() for t in (c, x_m))
    return _HeadMajorProjections.apply(c, x_m, kernels, num_heads, q_proj.weight, q_proj.bias, k_proj.weight, k_proj.bias,
                                       v_proj.weight, v_proj.bias)


class BlockDiagonalLinear(nn.Module):
    """y = W x + b with W block-diagonal: ``dim / block_size`` independent ``block_size x block_size`` blocks.

    The weight is stored as (num_blocks, out, in) like the official ``LinearHeadwiseExpand``.
    """

    def __init__(self, dim: int, block_size: int = 4, bias: bool = True):
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not divisible by block_size {block_size}")
        self.dim, self.block_size = dim, block_size
        self.weight = nn.Parameter(torch.empty(dim // block_size, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return block_diagonal_matmul(x, self.weight, self.bias)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample; identity at eval time."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, ...)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, sqrt(2 / (5 dim))) -- "Transformers without Tears" (Nguyen & Salazar 2019), as in the official code."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2 / (5 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int = 1) -> torch.Tensor:
    """N(0, 2 / num_blocks / sqrt(dim)) (GPT-NeoX); the official ViL uses num_blocks = 1."""
    return nn.init.normal_(weight, mean=0.0, std=2 / num_blocks / math.sqrt(dim))


def _fold_kernels(layer):
    """The CPU kernels for :class:`_FoldedGates`, or None (other devices or dtypes, a projection without a bias,
    under torch.compile: the PyTorch route then)."""
    if torch.compiler.is_compiling():
        return None
    for module in (layer.q_proj, layer.k_proj, layer.v_proj, layer.proj_up, layer.igate, layer.fgate):
        for p in (module.weight, module.bias):
            if p is None or p.dtype != torch.float32 or p.device.type != "cpu":
                return None
    return fused.ops()


class _FoldedGates(torch.autograd.Function):
    """The folds of :meth:`ViLLayer._folded_projections` as one call of the CPU kernels each way (``fold_gates``,
    ``fold_gates_backward``): the gates' weights on x (G_v W_v W_m), their bias and their weights on c (G_q W_q +
    G_k W_k) from the parameters. As PyTorch operations each fold was a few dozen small operations and autograd
    nodes a layer, run every step on the main thread while the other waits: ViL-T's 24 folds took 7.8 ms forward and
    16.6 ms backward a step, here 5.1 and 10.7 (2 threads of an AMX Xeon, session 44; the rest is the nodes' and the
    parameters' own overhead). float32 parameters."""

    @staticmethod
    def forward(ctx, kernels, w_i, w_f, w_q, w_k, w_v, b_q, b_k, b_v, w_m, b_m, b_i, b_f):
        # w_i, w_f: (H, 3 inner); w_q, w_k, w_v: (nb, bs, bs) block-diagonal; b_q, b_k, b_v, b_m: (inner,);
        # w_m: (inner, D); b_i, b_f: (H,) -> w_g (2H, D), gate_b (2H,), gate_c (2H, inner)
        params = [t.contiguous() for t in (w_i, w_f, w_q, w_k, w_v, b_q, b_k, b_v, w_m, b_m, b_i, b_f)]
        w_g, gate_b, gate_c, gate_v = kernels.fold_gates(*params)
        ctx.save_for_backward(gate_v, *params[:10])
        ctx.kernels = kernels
        return w_g, gate_b, gate_c

    @staticmethod
    def backward(ctx, grad_w_g, grad_gate_b, grad_gate_c):
        gate_v, *params = ctx.saved_tensors
        G, inner = gate_v.shape
        grad_w_g = gate_v.new_zeros(G, params[8].shape[1]) if grad_w_g is None else grad_w_g.contiguous()
        grad_gate_b = gate_v.new_zeros(G) if grad_gate_b is None else grad_gate_b.contiguous()
        grad_gate_c = gate_v.new_zeros(G, inner) if grad_gate_c is None else grad_gate_c.contiguous()
        return None, *ctx.kernels.fold_gates_backward(grad_w_g, grad_gate_b, grad_gate_c, gate_v, *params)


class ViLLayer(nn.Module):
    """The mLSTM layer of a ViL block. (B, T, D) -> (B, T, D), tokens in the order the block traverses them.

    up-projection D -> 2 x inner (x_m, z); depthwise 3x3 conv of x_m on the token grid; q, k from SiLU(conv),
    v from x_m (block-diagonal); gates from concat[q, k, v]; mLSTM cell; per-head norm; learnable skip; output
    gate SiLU(z); down-projection inner -> D.
    """

    def __init__(self, dim: int, expansion: int = 2, num_heads: int = 4, qkv_block_size: int = 4,
                 conv_kernel_size: int = 3, mlstm_mode: str = "parallel", chunk_size: int = 64):
        super().__init__()
        check_mode(mlstm_mode, "mlstm_mode")
        if conv_kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel_size must be odd to keep the grid size, got {conv_kernel_size}")
        inner = expansion * dim
        if inner % num_heads:
            raise ValueError(f"inner dim {inner} is not divisible by num_heads {num_heads}")
        self.dim, self.inner, self.num_heads = dim, inner, num_heads
        self.mlstm_mode, self.chunk_size = mlstm_mode, chunk_size
        self.reference_path = False  # True: run forward_reference (benchmark baseline)
        self.proj_up = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv2d(inner, inner, conv_kernel_size, padding=conv_kernel_size // 2, groups=inner)
        self.q_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.k_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.v_proj = BlockDiagonalLinear(inner, qkv_block_size)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = MultiHeadNorm(inner, num_heads)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim)
        self.reset_parameters()

    def reset_parameters(self):
        small_init_(self.proj_up.weight, self.dim)
        wang_init_(self.proj_down.weight, self.dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, self.dim)  # the official code uses the embedding dim here, not inner
            nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.proj_up.bias)
        nn.init.zeros_(self.proj_down.bias)
        self.conv.reset_parameters()
        # Forget gate starts open (sigmoid(3..6) ~ 0.95..0.998) so memory persists; input gate starts near 1.
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.ones_(self.learnable_skip)
        nn.init.zeros_(self.outnorm.weight)
        nn.init.zeros_(self.outnorm.bias)

    def _conv_on_grid(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        h, w = grid
        if h * w != T:
            raise ValueError(f"got {T} tokens for a {h}x{w} grid")
        # The tokens are laid back on the grid in the order this layer sees them; for the reversed block that is
        # the grid rotated by 180 degrees, as in the official code (so official weights give the same outputs).
        # A channels-last view of the grid: the conv reads and writes (B, T, C) without layout copies.
        y = self.conv(x.reshape(B, h, w, C).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        return y.permute(0, 2, 3, 1).reshape(B, T, C)

    def _conv_silu(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        """SiLU(conv on the grid): the CPU kernels (:class:`_ConvSiLUKernel`) where they apply, else PyTorch's."""
        dtype = compute_dtype(x)
        kernels = layer_kernels(x, dtype) if self.conv.kernel_size[0] in _KERNEL_CONV_SIZES else None
        if kernels is None:
            return F.silu(self._conv_on_grid(x, grid))
        h, w = grid
        if h * w != x.shape[1]:
            raise ValueError(f"got {x.shape[1]} tokens for a {h}x{w} grid")
        return _ConvSiLUKernel.apply(x.to(dtype).contiguous(), kernels, h, w, self.conv.weight, self.conv.bias)

    def _folded_projections(self):
        """Weights that merge the gate projection into the products that already read the same inputs.

        The gates read concat[q, k, v] with q = Wq c + bq, k = Wk c + bk, v = Wv x_m + bv and x_m = W_m x + b_m, so
        gates = (Gq Wq + Gk Wk) c + (Gv Wv W_m) x + const: one thin product on x beside the up-projection's and one
        on c instead of a (3 inner)-wide concat and its gradient. Same math, same parameters, different rounding.
        Returns W_m, b_m, W_z, b_z, W_g (2H, D), b_g (2H,) and gate_c (2H, inner), in the parameters' dtype: autocast
        is off here (these are parameter-sized; the products that use them round them once), and the three folds
        are one broadcast product (this runs every step, and its few dozen small operations were a visible share of
        a step's fixed cost).
        """
        inner, G = self.inner, 2 * self.num_heads
        kernels = _fold_kernels(self)
        if kernels is not None:  # the folds as one node over the CPU kernels (_FoldedGates)
            (w_m, w_z), (b_m, b_z) = self.proj_up.weight.split(inner), self.proj_up.bias.split(inner)
            w_g, gate_b, gate_c = _FoldedGates.apply(
                kernels, self.igate.weight, self.fgate.weight, self.q_proj.weight, self.k_proj.weight,
                self.v_proj.weight, self.q_proj.bias, self.k_proj.bias, self.v_proj.bias, w_m, b_m, self.igate.bias,
                self.fgate.bias)
            return w_m, b_m, w_z, b_z, w_g, gate_b, gate_c
        with torch.autocast(self.proj_up.weight.device.type, enabled=False):
            gate_w = torch.cat([self.igate.weight, self.fgate.weight])  # (G, 3 inner): [Gq, Gk, Gv]
            blocks = torch.stack([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3, nb, bs, bs)
            nb, bs = blocks.shape[1], blocks.shape[2]
            # G_t W_t for t = q, k, v: sum over o of G_t[g, j bs + o] W_t[j, o, i], as (G, 3, nb, o, 1) * (3, nb, o, i)
            folded = (gate_w.view(G, 3, nb, bs, 1) * blocks).sum(3).view(G, 3, inner)
            gate_c, gate_v = folded[:, 0] + folded[:, 1], folded[:, 2]  # acting on c and on x_m
            (w_m, w_z), (b_m, b_z) = self.proj_up.weight.split(inner), self.proj_up.bias.split(inner)
            qkv_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            gate_b = torch.cat([self.igate.bias, self.fgate.bias]) + gate_w @ qkv_bias + gate_v @ b_m
            return w_m, b_m, w_z, b_z, gate_v @ w_m, gate_b, gate_c

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.reference_path:
            return self.forward_reference(x, grid)
        B, T, _ = x.shape
        H, inner = self.num_heads, self.inner
        w_m, b_m, w_z, b_z, w_g, b_g, gate_c = self._folded_projections()
        device = x.device.type
        low_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if low_dtype is not None:
            # The three products below read x: cast it once (autocast would cast it for each, forward and backward).
            x = x.to(low_dtype)
        # In fp32 training with the CPU kernels, z's bias is left to the gated norm's kernel, which adds it as it reads
        # z (and sums z's gradient's columns for it in backward): MKL's addmm would first write the bias over the
        # whole (B, T, inner) output (a copy pass, about 0.9 ms of ViL-T's layer in session 39's profile) and then
        # read it back. (Inference fuses the bias into the product instead, and bf16 products do in training too.)
        z_bias = b_z if (torch.is_grad_enabled() and x.dtype == torch.float32 and b_z is not None
                         and layer_kernels(x, x.dtype) is not None) else None
        # (B, T, inner), (B, T, inner), (B, T, 2H): three products, so that x_m, which the conv reads, is contiguous
        x_m, z, gates_x = _UpProjections.apply(x, not torch.is_grad_enabled(), w_m, b_m, w_z,
                                               b_z if z_bias is None else None, w_g, b_g)
        kernels = self._head_kernels(x_m)
        if kernels is not None and self.mlstm_mode == "parallel" and projected_form_applies(x_m, H):
            # Inference: q, k, v are computed inside the cell's kernel, never written out, and the kernel ends with
            # the output path: h is not written out either
            y = self._projected_output(kernels, x_m, grid, gate_c, gates_x, z)
        else:
            training_cell = torch.is_grad_enabled() and self.mlstm_mode == "parallel"
            # The cell's whole kernels (under bf16 autocast, or in fp32) with the layer's kernels
            whole_kernels = kernels is not None and (low_dtype == torch.bfloat16
                                                     or (low_dtype is None and x_m.dtype == torch.float32))
            # In training with those, the cell's kernels compute q, k, v from c and x_m themselves, slice by slice
            # in cache, forward and backward (the same bits as the projections' block_diag_mm): the projections do
            # not write them out (q, k, v below are then placeholders)
            inside = training_cell and whole_kernels and projected_training_applies(x_m, H)
            # the cell's fp32 backward may take the projections' backward too: it leaves their weights' gradients
            # here for _ConvHeadProjections' backward (cell.ProjectedSources.outbox)
            outbox = {} if inside else None
            c, gates_c, q, k, v = self._conv_gates_heads(kernels, x_m, grid, gate_c, heads=not inside, outbox=outbox)
            igate, fgate = self._gates(gates_x, gates_c)
            # The cell's backward recomputes q, k, v from c and x_m (which the projections, the conv and the output
            # path keep anyway) instead of holding them from forward: 3 cheap block-diagonal products per layer in
            # backward for three (B, H, T, DH) tensors fewer per layer (docs/performance.md: session 22)
            rebuild = functools.partial(self._qkv_heads_again, c.detach(), x_m.detach(), low_dtype) \
                if training_cell else None
            # With those kernels, the cell's whole-backward kernel can compute q, k, v again itself, slice by slice
            # in cache, rather than the projections writing them out for it (same bits: block_diag_mm's sums)
            sources = ProjectedSources(c.detach(), x_m.detach(), H, self._projection_weights(c.dtype), inside,
                                       outbox) \
                if rebuild is not None and whole_kernels else None
            h = mlstm(q, k, v, igate, fgate, mode=self.mlstm_mode, chunk_size=self.chunk_size, rebuild=rebuild,
                      token_major=True, sources=sources)  # (B, H, T, DH), token-major memory (parallel form)
            # The output path (per-head norm, skip, output gate) runs in h's dtype: under autocast the low dtype,
            # where autocast itself would run the norm and the chain after it in fp32 (four fp32 passes and two
            # casts); the norm's statistics still accumulate in fp32. The parallel cell writes h in token-major memory.
            h = h.transpose(1, 2)  # (B, T, H, DH)
            if low_dtype is not None:
                h = h.to(low_dtype)
            with torch.autocast(device, enabled=False):
                y = gated_head_norm_output(h, c, z, self.outnorm, self.learnable_skip, z_bias)  # (B, T, inner)
        if torch.is_grad_enabled():
            kernels = layer_kernels(y, y.dtype)
            if kernels is None:
                return self.proj_down(y)  # (B, T, D); autocast again
            return _DownProjection.apply(y, kernels, self.proj_down.weight, self.proj_down.bias)
        if y.dtype not in (torch.bfloat16, torch.float32):
            return self.proj_down(y)
        down = self.proj_down  # inference: the bias fused into the product (linear_rows), rounded as autocast would
        bias = None if down.bias is None else down.bias.to(y.dtype)
        return linear_rows(y.reshape(B * T, inner), down.weight.to(y.dtype), bias, fuse_fp32=True).view(B, T, -1)

    def _head_kernels(self, x_m: torch.Tensor):
        """The CPU kernels (:func:`layer_kernels`) for the conv and the q, k, v projections of x_m (B, T, inner), or
        None where they do not apply (other devices or dtypes, kernel or block sizes they lack)."""
        bs = self.q_proj.block_size
        usable = (self.conv.kernel_size[0] in _KERNEL_CONV_SIZES and (self.inner // self.num_heads) % bs == 0
                  and all(p.block_size == bs for p in (self.k_proj, self.v_proj)))
        return _block_kernels(x_m, compute_dtype(x_m), bs) if usable else None

    def _gates(self, gates_x: torch.Tensor, gates_c: torch.Tensor):
        """The input and forget gates' pre-activations (B, H, T) each, contiguous, from their two parts (B, T, 2H)."""
        gates = (gates_x + gates_c).transpose(1, 2)  # (B, 2H, T)
        return gates[:, :self.num_heads].contiguous(), gates[:, self.num_heads:].contiguous()

    def _check_grid(self, x: torch.Tensor, grid: tuple[int, int]):
        if grid[0] * grid[1] != x.shape[1]:
            raise ValueError(f"got {x.shape[1]} tokens for a {grid[0]}x{grid[1]} grid")

    def _conv_gates_heads(self, kernels, x_m: torch.Tensor, grid: tuple[int, int], gate_c: torch.Tensor,
                          heads: bool = True, outbox: dict | None = None):
        """c = SiLU(conv(x_m)) (B, T, inner), c's part of the gates c @ gate_c^T (B, T, 2H), and q, k, v (B, H, T, DH)
        each: one node over the CPU kernels (:meth:`_head_kernels`) where they apply
        (:class:`_ConvHeadProjections`), else the conv, the projections and the product separately. heads=False
        (with the kernels only): q, k, v are placeholders of their shape, for a cell that computes them itself."""
        if kernels is None:
            c = self._conv_silu(x_m, grid)
            return (c, F.linear(c, gate_c), *self._qkv_heads(c, x_m))
        self._check_grid(x_m, grid)
        return _ConvHeadProjections.apply(x_m.to(compute_dtype(x_m)).contiguous(), kernels, *grid, self.conv.weight,
                                          self.conv.bias, gate_c, self.num_heads, heads, outbox, self.q_proj.weight,
                                          self.q_proj.bias, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight,
                                          self.v_proj.bias)

    def _projected_output(self, kernels, x_m: torch.Tensor, grid: tuple[int, int], gate_c: torch.Tensor,
                          gates_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Inference with the CPU kernels (bf16 or fp32): the output path's y (B, T, inner) from the cell with the
        q, k, v projections inside its kernel and the output path at its end (:func:`cell.mlstm_parallel_projected`):
        the same values as :meth:`_conv_gates_heads`, the parallel cell and :func:`gated_head_norm_output` give,
        without writing q, k, v or h out."""
        self._check_grid(x_m, grid)
        x_m = x_m.contiguous()
        c = torch.empty_like(x_m)
        gates_c = kernels.conv_silu_forward(x_m, *grid, self.conv.weight, self.conv.bias, c, gate_c.to(c.dtype))
        igate, fgate = self._gates(gates_x, gates_c)  # (c's part of the gates summed by the conv's kernel)
        output = (z.to(c.dtype), self.outnorm.weight, self.outnorm.bias, self.learnable_skip, self.outnorm.eps)
        return mlstm_parallel_projected(c, x_m, self.num_heads, self._projection_weights(c.dtype), igate, fgate,
                                        output=output)

    def _projection_weights(self, dtype: torch.dtype) -> tuple:
        """((Wq, bq), (Wk, bk), (Wv, bv)) in the products' dtype (as autocast rounds them), biases None where absent:
        the q, k, v projections as the cell's projected kernels take them."""
        return tuple((p.weight.to(dtype), None if p.bias is None else p.bias.to(dtype))
                     for p in (self.q_proj, self.k_proj, self.v_proj))

    def _qkv_heads(self, c: torch.Tensor, x_m: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k (from c) and v (from x_m), (B, H, T, DH) each: head-major memory from the CPU kernels, else head
        views of token-major memory (PyTorch's route; the cell copies them)."""
        heads = head_major_projections(c, x_m, self.num_heads, self.q_proj, self.k_proj, self.v_proj)
        if heads is not None:
            return heads
        B, T, _ = c.shape
        return tuple(t.view(B, T, self.num_heads, -1).transpose(1, 2)
                     for t in (self.q_proj(c), self.k_proj(c), self.v_proj(x_m)))

    def _qkv_heads_again(self, c: torch.Tensor, x_m: torch.Tensor, low_dtype) -> tuple[torch.Tensor, ...]:
        """:meth:`_qkv_heads` as :meth:`forward` ran it (under its autocast dtype), without grad: the cell's rebuild."""
        with torch.no_grad(), torch.autocast(c.device.type, dtype=low_dtype, enabled=low_dtype is not None):
            return self._qkv_heads(c, x_m)

    def forward_reference(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The same layer written plainly, as in the paper and the official code (unfused projections, the
        autograd-derived parallel cell). Kept as the baseline for benchmarks and equivalence tests."""
        B, T, _ = x.shape
        H = self.num_heads
        x_m, z = self.proj_up(x).chunk(2, dim=-1)
        c = F.silu(self._conv_on_grid(x_m.contiguous(), grid))
        q, k, v = (torch.einsum("ntbi,boi->ntbo", t.reshape(B, T, -1, proj.block_size), proj.weight).reshape(B, T, -1)
                   + proj.bias for t, proj in ((c, self.q_proj), (c, self.k_proj), (x_m, self.v_proj)))
        gate_in = torch.cat([q, k, v], dim=-1)
        igate, fgate = self.igate(gate_in).transpose(1, 2), self.fgate(gate_in).transpose(1, 2)  # (B, H, T)
        q, k, v = (t.reshape(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
        h = mlstm_parallel_reference(q, k, v, igate, fgate) if self.mlstm_mode == "parallel" else \
            mlstm(q, k, v, igate, fgate, mode=self.mlstm_mode, chunk_size=self.chunk_size)
        h = self.outnorm(h.transpose(1, 2).reshape(B, T, -1)) + self.learnable_skip * c
        return self.proj_down(h * F.silu(z))


class _TokenNormKernel(torch.autograd.Function):
    """The block's input norm (:class:`OffsetLayerNorm`) as the CPU kernels (``csrc/layer_cpu.cpp``): one pass
    writes the normalised tokens in the layer's dtype (under autocast its low dtype, which the layer's first products
    would cast them to anyway) and, for the reversed block, in reversed order; backward reads the gradient in that
    order. PyTorch's route: the norm in fp32, a flip, a cast (and backward the same). Statistics in fp32, kept from
    forward; parameter gradients summed in fp32.

    Returns x as well (a view of it, for the block's residual sum): then the residual path's gradient comes back to
    this node and the backward pass sums it into the norm's input gradient as it writes that, instead of autograd
    adding the two (B, T, D) gradients in a pass of its own."""

    @staticmethod
    def forward(ctx, x, kernels, weight, bias, eps, reverse, dtype):
        # x: (B, T, D) contiguous -> ((B, T, D) in dtype, tokens reversed when reverse; x itself)
        out = torch.empty(x.shape, dtype=dtype)
        mean, rstd = kernels.token_norm_forward(x, weight, bias, eps, reverse, out)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.kernels, ctx.reverse = kernels, reverse
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out, x  # (autograd returns an input as a view of it, with this node as its gradient's destination)

    @staticmethod
    def backward(ctx, grad_out, grad_residual):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad_residual is not None:
            grad_residual = grad_residual.to(x.dtype).contiguous()
        if grad_out is None:
            return grad_residual, None, None, None, None, None, None
        grad_x, grad_w, grad_b = ctx.kernels.token_norm_backward(grad_out.contiguous(), x, weight, mean, rstd,
                                                                 ctx.reverse, grad_residual)
        grad_b = grad_b.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return grad_x, None, grad_w.to(weight.dtype), grad_b, None, None, None


class _AddReversedKernel(torch.autograd.Function):
    """x + y.flip(1) as one pass of the CPU kernels, in x's dtype; backward: x's gradient as it is, y's flipped and
    cast to y's dtype in one pass (PyTorch's route: a flip and an add forward, a flip and a cast backward)."""

    @staticmethod
    def forward(ctx, x, y, kernels):  # x, y: (B, T, D) contiguous
        out = torch.empty_like(x)
        kernels.add_reversed(x, y, out)
        ctx.kernels, ctx.y_dtype = kernels, y.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad_y = torch.empty(grad_out.shape, dtype=ctx.y_dtype)
        ctx.kernels.add_reversed(None, grad_out, grad_y)
        return grad_out, grad_y, None


class ViLBlock(nn.Module):
    """x + DropPath(Layer(LayerNorm(x))) with the layer run over the tokens in one traversal direction."""

    def __init__(self, dim: int, reverse: bool = False, drop_path: float = 0.0, **layer_kwargs):
        super().__init__()
        self.reverse = reverse
        self.norm = OffsetLayerNorm(dim)
        self.layer = ViLLayer(dim, **layer_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # (B, T, D) raster order -> same
        dtype = compute_dtype(x)
        kernels = layer_kernels(x, dtype) if x.dtype in (torch.float32, torch.bfloat16) else None
        if kernels is None or self.layer.reference_path:
            y = self.norm(x)
            if self.reverse:  # traverse from the bottom-right patch: reverse before the layer, back after
                y = self.layer(y.flip(1), grid).flip(1)
            else:
                y = self.layer(y, grid)
            return x + self.drop_path(y)
        # The CPU kernels: the norm writes the layer's dtype and order; the reversed block's sum flips y back
        normed, x = _TokenNormKernel.apply(x.contiguous(), kernels, self.norm.weight, self.norm.bias, self.norm.eps,
                                           self.reverse, dtype)
        y = self.layer(normed, grid)
        dropping = self.drop_path.training and self.drop_path.drop_prob > 0
        if self.reverse and not dropping and y.dtype in (torch.float32, torch.bfloat16):
            return _AddReversedKernel.apply(x, y.contiguous(), kernels)
        return x + self.drop_path(y.flip(1) if self.reverse else y)


class ViLBlockPair(nn.Module):
    """Two blocks: raster order, then reversed. ``depth`` in the model counts these pairs (like ViT blocks)."""

    def __init__(self, dim: int, drop_path: float = 0.0, **layer_kwargs):
        super().__init__()
        self.forward_block = ViLBlock(dim, reverse=False, drop_path=drop_path, **layer_kwargs)
        self.backward_block = ViLBlock(dim, reverse=True, drop_path=drop_path, **layer_kwargs)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # (B, T, D)
        return self.backward_block(self.forward_block(x, grid), grid)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens. (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # initialised like an nn.Linear over the flat patch
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ConvStem(nn.Module):
    """Convolutional tokenizer for small images: 3x3 convs with batch norm and SiLU, halving the resolution
    log2(patch_size) times. (B, C, H, W) -> (B, H/p, W/p, D). Cheaper per token than a large linear patch and
    gives the blocks local features to start from (as in CCT, Hassani et al. 2021)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        levels = int(round(math.log2(patch_size)))
        if 2 ** levels != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch_size, got {patch_size}")
        widths = [max(dim // 2 ** (levels - i), 16) for i in range(levels + 1)]  # ..., dim/2, dim
        layers = [nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.SiLU()]
        for i in range(levels):
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(widths[i + 1]), nn.SiLU()]
        layers.append(nn.Conv2d(widths[-1], dim, 1))
        self.layers = nn.Sequential(*layers)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).permute(0, 2, 3, 1)


def interpolate_pos_embed(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1, h, w, D) position embedding to (1, *grid, D) with bicubic interpolation."""
    if tuple(embed.shape[1:3]) == tuple(grid):
        return embed
    resized = F.interpolate(embed.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1)


class PosEmbed2d(nn.Module):
    """Learnable 2D position embedding added to the patch grid, interpolated if the grid size changes."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, *grid, dim))
        nn.init.trunc_normal_(self.embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, h, w, D) -> (B, h, w, D)
        return x + interpolate_pos_embed(self.embed, x.shape[1:3])
