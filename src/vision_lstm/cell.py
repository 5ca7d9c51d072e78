"""The mLSTM cell: pure math, no parameters.

Three equivalent forms of the same function (xLSTM paper, Beck et al. 2024, Sec. 2.3 and App. A.3):

* ``parallel``  -- all T x T interactions at once, O(T^2) time and memory; fastest for short sequences.
* ``chunkwise`` -- parallel inside chunks of ``chunk_size`` tokens, (C, n, m) state carried across chunks;
  cost grows linearly with T.
* ``recurrent`` -- one token at a time, O(1) memory in T; also exposed step by step (:func:`mlstm_step`)
  for streaming inference.

All three use the same stabiliser m_t = max_{s<=t} log D[t, s] (the recurrent form starts from m_0 = -inf),
so they agree to rounding error, including the ``max(|.|, exp(-m_t))`` floor of the normaliser.

Shapes: B batch, H heads, T tokens, DH head dim. Gate pre-activations are one scalar per head and token.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fused

MODES = ("parallel", "chunkwise", "recurrent")
_LOG_DECAY_FLOOR = -60.0
DEFAULT_EPS = 1e-6


class ProjectedSources(NamedTuple):
    """What the parallel cell's q, k, v were computed from: q = Wq c + bq, k = Wk c + bk, v = Wv x_m + bv with W
    block-diagonal (the ViL layer's projections; as :func:`mlstm_parallel_projected` takes them). Given to
    :func:`mlstm_parallel` with ``rebuild``, its whole-backward kernel computes q, k, v again slice by slice from
    these (``backward_bf16_projected``) where it applies, instead of calling ``rebuild``, which writes them out."""
    c: torch.Tensor  # (B, T, H * DH)
    x_m: torch.Tensor  # (B, T, H * DH)
    num_heads: int
    projections: tuple  # ((Wq, bq), (Wk, bk), (Wv, bv)): W (H * DH / bs, bs, bs), b (H * DH,) or None
    # q, k, v given to the cell are placeholders (their shape only, never read): the cell computes them from these
    # in forward too (forward_bf16_projected, where :func:`projected_training_applies`), else calls rebuild for them
    placeholders: bool = False
    # A dict the caller made for this forward, or None. Given, the whole backward also takes the projections'
    # backward where it applies (``backward_fp32_projected_sources``, ``backward_bf16_projected_sources``; weight
    # and bias gradients in fp32, c's and x_m's in their dtype): the gradients it returns for q and v are then
    # c's gradient through q and k (Wq^T dq + Wk^T dk) and x_m's through v (Wv^T dv), as (B, H, T, DH) views of
    # (B, T, H * DH) memory, none for k, and it puts the projections' weight and bias gradients (fp32: wq, bq, wk,
    # bk, wv, bv) under "projection_grads" here, for the caller's backward that receives those two gradients (it
    # runs after this one: it needs them). That caller must then pass those gradients to c and x_m as they are.
    outbox: dict | None = None


class MLSTMState(NamedTuple):
    """Recurrent state carried between tokens or chunks."""

    C: torch.Tensor  # (B, H, DH, DH) matrix memory, sum of weighted (k / sqrt(DH)) v^T
    n: torch.Tensor  # (B, H, DH) normaliser, sum of weighted k / sqrt(DH)
    m: torch.Tensor  # (B, H) stabiliser (log scale of C and n)


def init_state(batch: int, heads: int, head_dim: int, *, dtype=torch.float32, device=None) -> MLSTMState:
    """The empty state: no memory, stabiliser -inf (so the first token sets it, as in the parallel form)."""
    return MLSTMState(
        C=torch.zeros(batch, heads, head_dim, head_dim, dtype=dtype, device=device),
        n=torch.zeros(batch, heads, head_dim, dtype=dtype, device=device),
        m=torch.full((batch, heads), float("-inf"), dtype=dtype, device=device),
    )


def _check_inputs(q, k, v, igate, fgate):
    if q.ndim != 4:
        raise ValueError(f"q must have shape (B, H, T, DH), got {tuple(q.shape)}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if igate.shape != q.shape[:3] or fgate.shape != q.shape[:3]:
        raise ValueError(
            f"gate pre-activations must have shape (B, H, T) = {tuple(q.shape[:3])}, "
            f"got {tuple(igate.shape)} and {tuple(fgate.shape)}"
        )


def mlstm_parallel_reference(q, k, v, igate, fgate, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Parallel form (xLSTM eqs. 59-64), written plainly; autograd derives the backward pass.

    q, k, v: (B, H, T, DH); igate, fgate: (B, H, T) pre-activations i~, f~. Returns h: (B, H, T, DH).

    log D[t, s] = F_t - F_s + i~_s for s <= t (F = cumsum log sigmoid(f~)), m_t = max_s log D[t, s],
    C[t, s] = (q_t . k_s / sqrt(DH)) exp(log D[t, s] - m_t), n_t = max(|sum_s C[t, s]|, exp(-m_t)),
    h_t = sum_s C[t, s] v_s / (n_t + eps).
    """
    _check_inputs(q, k, v, igate, fgate)
    T, DH = q.shape[-2], q.shape[-1]
    cum_log_f = torch.cumsum(F.logsigmoid(fgate), dim=-1)  # (B, H, T)
    log_d = cum_log_f[..., :, None] - cum_log_f[..., None, :] + igate[..., None, :]  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    m = log_d.amax(dim=-1, keepdim=True)  # (B, H, T, 1); finite: the diagonal term i~_t is always present
    scores = (q @ k.transpose(-2, -1)) * (DH ** -0.5) * torch.exp(log_d - m)  # (B, H, T, T)
    normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs(), torch.exp(-m))  # (B, H, T, 1)
    return (scores @ v) / (normaliser + eps)


def _decay_matrix(igate, fgate):
    """D[t, s] = exp(log D[t, s] - m_t), m_t and the column of each row's maximum, for the parallel form.

    (B, H, T) x2 -> (B, H, T, T), (B, H, T, 1), (B, H, T, 1).

    log D[t, s] = F_t + a_s with a_s = i~_s - F_s, so the row maximum over s <= t is F_t plus the running maximum
    of a: m_t and its column come from one O(T) cummax instead of a masked max over T x T, and
    log D[t, s] - m_t = a_s - cummax(a)_t needs no F_t at all.
    """
    cum_log_f = torch.cumsum(F.logsigmoid(fgate), dim=-1)  # (B, H, T)
    a = igate - cum_log_f
    running_max, argmax = torch.cummax(a, dim=-1)  # (B, H, T) each
    m = (cum_log_f + running_max).unsqueeze(-1)  # (B, H, T, 1)
    # exp() is several times slower on -inf and on arguments whose result is subnormal (measured 3.2 ms vs 0.43 ms
    # for a (128, 4, 49, 49) tensor). Terms below exp(-60) ~ 1e-26 relative to the row maximum are far below
    # rounding even in float64, so clamp there. The upper clamp keeps the non-causal entries (s > t, where
    # a_s may exceed the running maximum) finite; tril_ then zeroes them exactly.
    decay = torch.sub(a.unsqueeze(-2), running_max.unsqueeze(-1))  # (B, H, T, T)
    decay = decay.clamp_(_LOG_DECAY_FLOOR, 0.0).exp_().tril_()
    return decay, m, argmax.unsqueeze(-1)


def _decay_vectors(igate, fgate):
    """What the fused kernels build D from: a = i~ - F and its running maximum (B, H, T), contiguous, and, as
    :func:`_decay_matrix`, m_t and the column of each row's maximum (B, H, T, 1)."""
    cum_log_f = torch.cumsum(F.logsigmoid(fgate), dim=-1)  # (B, H, T)
    a = (igate - cum_log_f).contiguous()
    running_max, argmax = torch.cummax(a, dim=-1)  # (B, H, T) each
    m = (cum_log_f + running_max).unsqueeze(-1)  # (B, H, T, 1)
    return a, running_max.contiguous(), m, argmax.unsqueeze(-1)


def _fused_division(kernels, num: torch.Tensor, denom: torch.Tensor) -> bool:
    """Whether the fused kernels' row division applies: bf16 rows (B, H, T, DH) with a unit last stride, fp32
    denominators (B, H, T, 1)."""
    return (kernels is not None and num.dtype == torch.bfloat16 and num.ndim == 4 and num.stride(-1) == 1
            and denom.dtype == torch.float32 and denom.is_contiguous())


def _divide_rows(num: torch.Tensor, denom: torch.Tensor, out: torch.Tensor, kernels=None) -> torch.Tensor:
    """out = num / denom for num (..., T, DH) and a per-row denom (..., T, 1); out may have any strides.

    For a low-precision num (bf16) and an fp32 denom, PyTorch's mixed-dtype division is a slow path on the CPU (not
    vectorised: 2.5-12.7 ms against 0.6-1.1 ms for bf16 / bf16 on ViL-T's (128, 4, 64, 96), 2 cores, session 17).
    Rounding denom to bf16 would make that fast but add a per-row error as large as bf16's rounding itself. Instead
    1 / denom (fp32) is split into a bf16 pair hi + lo (hi + lo = 1 / denom to ~2^-17) and out = num * hi + num * lo
    in two vectorised bf16 passes that compute in fp32 and round once (the addcmul): the fp32 quotient rounded to
    bf16, up to one bf16 unit in rare near-ties (0.07 % of the elements in the measurement above). With the fused
    kernels (``kernels``, :mod:`vision_lstm.fused`) it is one vectorised pass that divides in fp32 and rounds once.
    """
    if _fused_division(kernels, num, denom):
        kernels.divide_rows(num, denom.squeeze(-1), out)
        return out
    if num.dtype == denom.dtype or num.element_size() >= 4 or num.device.type != "cpu":  # (fast there already)
        return torch.div(num, denom, out=out)
    recip = denom.reciprocal()  # (..., T, 1), fp32
    hi = recip.to(num.dtype)
    lo = (recip - hi.float()).to(num.dtype)
    torch.mul(num, lo, out=out)
    return out.addcmul_(num, hi)


class _ParallelMLSTM(torch.autograd.Function):
    """The parallel form with a hand-written backward pass.

    Same math as :func:`mlstm_parallel_reference`, but the (B, H, T, T) intermediates are computed in place, the
    decay matrix D and the weights C = S * D are kept for backward (no recomputation, no transposed copies), and
    the backward makes about half the passes over T x T memory that autograd makes. The gradient includes the
    path through the stabiliser m (which matters through eps and the exp(-m) floor), routed to the row maximum.

    ``low_dtype`` (the autocast dtype, or None): q, k, v arrive in it, and five of the six T x T products run in
    it (C v forward; C^T dN, dN v^T, dS k, dS^T q backward), each accumulating in fp32 inside the kernel, which is
    about 5x faster than fp32 on a CPU with bf16 matrix units. The scores q k^T stay fp32, as do the gates, the
    stabiliser, the normaliser and every elementwise pass: rounding the scores to bf16 moves the gradients of q,
    k and the gates by 14-25 % (relative norm, measured against float64 on ViL-T's shapes), rounding any of the
    other five products by at most 0.34 %, the size of bf16's own rounding (tests/test_cell.py pins this). D and C
    are kept for backward in the low dtype (C is rounded for the C v product anyway): that halves the two largest
    saved tensors and moved the errors above by at most 0.05 percentage points (0.50 to 0.55 % at most).

    ``rebuild`` (a callable, or None): returns q, k, v again, with the values and layouts they came in. Given, q, k
    and v are not kept for backward, which calls it instead: for the ViL layer it recomputes three cheap block-
    diagonal projections from inputs that other operations keep anyway, and three (B, H, T, DH) tensors per layer
    (a quarter of a ViL-T training step's saved activations) are not held from forward to backward.

    ``kernels`` (the operators of :mod:`vision_lstm.fused`, or None): on the CPU the elementwise passes between the
    products run as single fused C++ passes (forward: C = S D' and its row sums from the fp32 scores; backward:
    dS = (dN v^T + d row sum) D' with the row and column sums of dC C; the two row divisions), with D' rebuilt from
    O(T) vectors instead of being stored, so only C is kept as a T x T tensor. In bf16 on CPUs with AVX512-BF16
    the whole forward and the whole backward are one kernel each, slice by slice in cache (the backward's dN v^T
    then stays in fp32 rather than being rounded to bf16), and so they are in fp32 on every CPU (``forward_fp32``,
    ``backward_fp32``: the products only where the causal mask leaves them nonzero). Same math and precision
    policy otherwise; without them (no compiler, ``VIL_FUSED=0``, other devices) the PyTorch passes below run.
    """

    @staticmethod
    def forward(ctx, q, k, v, igate, fgate, eps, low_dtype, kernels, rebuild, token_major, sources):
        scale = q.shape[-1] ** -0.5
        projected = sources is not None and sources.placeholders
        if projected and not (rebuild is not None and _projected_forward(kernels, q, v, low_dtype, sources)):
            q, k, v = rebuild()  # not computed by the caller, and the projected kernel does not apply: here they are
            projected = False
        if kernels is None:
            decay, m, argmax = _decay_matrix(igate, fgate)  # (B, H, T, T), (B, H, T, 1) x2
            # The 1/sqrt(DH) of the scores goes into the decay matrix (T x T) rather than into q (T x DH, DH > T in
            # ViL): one pass fewer forward and backward. D * scale is what the backward needs anyway.
            decay.mul_(scale)
        else:  # the fused kernels build D from these O(T) vectors on the fly, forward and backward
            a, running_max, m, argmax = _decay_vectors(igate, fgate)  # (B, H, T) x2, (B, H, T, 1) x2
        # Callers often pass head views of a (B, T, H * DH) tensor; one contiguous copy each here replaces the
        # copies matmul would otherwise make of every operand, forward and backward. The gradients go back in
        # the callers' layouts (see backward), so the projections that made q, k, v need no copy of their own.
        ctx.layouts = (None,) * 3 if projected else tuple(None if t.is_contiguous() else _layout_of(t)
                                                          for t in (q, k, v))
        # (forward itself runs with grad mode off: ask ctx.) The copies are made with or without rebuild, so that
        # forward computes the same way (and rebuild gives the same gradients bit for bit).
        if any(ctx.needs_input_grad[:2]) and not projected:
            q, k = q.contiguous(), k.contiguous()  # backward's products read them in the dtype they came in
        # h comes back in q's layout, or in token-major memory if asked (the ViL layer reads it as (B, T, H * DH)),
        # written by the division that is needed anyway: no copy of its own.
        if token_major:
            B, H, T, _ = q.shape
            h = torch.empty(B, T, H, v.shape[-1], dtype=v.dtype, device=v.device).transpose(1, 2)
        else:
            h = torch.empty_like(q if ctx.layouts[0] is None else ctx.layouts[0], dtype=v.dtype, device=v.device)
        if projected or _whole_forward(kernels, q, v, low_dtype) or _whole_forward_fp32(kernels, q, k, v, low_dtype):
            # The whole forward in one kernel (bf16: AMX tiles or AVX512-BF16 dot products; fp32: multiply-adds):
            # S, C and its row sums, the normaliser, C v (summed in fp32 and divided before its one rounding) and
            # h, slice by slice in cache; q, k, v are read and h written in place, and C is written out only for
            # backward.
            needs_grad = any(ctx.needs_input_grad)
            if needs_grad and not projected:
                v = v.contiguous()
            weights_mm = (torch.empty(q.shape[:-1] + (q.shape[-2],), dtype=low_dtype or torch.float32)
                          if needs_grad else None)
            if projected:  # q, k, v computed slice by slice from their sources, as in backward
                (wq, bq), (wk, bk), (wv, bv) = sources.projections
                args = (sources.c, sources.x_m, sources.num_heads, wq, bq, wk, bk, wv, bv, a, running_max, m, scale,
                        eps, h)
                row_sum, normaliser = (kernels.forward_fp32_projected(*args, weights_mm) if low_dtype is None else
                                       kernels.forward_bf16_projected(*args, True, weights_mm))
            elif low_dtype is None:
                row_sum, normaliser = kernels.forward_fp32(q, k, v, a, running_max, m, scale, eps, weights_mm, h)
            else:
                row_sum, normaliser = kernels.forward_bf16(q, k, v, a, running_max, m, scale, eps, weights_mm, h)
            row_sum, normaliser = row_sum.unsqueeze(-1), normaliser.unsqueeze(-1)  # (B, H, T, 1)
        else:
            v = v.contiguous()
            if low_dtype is None:
                weights = q @ k.transpose(-2, -1)  # q_t . k_s
            else:  # the scores in fp32 (see the class docstring), cast in the copy where q, k were not copied
                weights = _contiguous_fp32(q) @ _contiguous_fp32(k).transpose(-2, -1)
            if kernels is None:
                weights.mul_(decay)  # C[t, s] = S[t, s] D[t, s] with S = q_t . k_s / sqrt(DH)
                row_sum = weights.sum(dim=-1, keepdim=True)  # (B, H, T, 1)
                weights_mm = weights if low_dtype is None else weights.to(low_dtype)
            else:  # the same C and row sums in one pass, C written in the products' dtype (in place for fp32)
                weights_mm = weights if low_dtype is None else torch.empty_like(weights, dtype=low_dtype)
                row_sum = kernels.weights_forward(weights, a, running_max, scale, weights_mm).unsqueeze(-1)
            normaliser = torch.maximum(row_sum.abs(), torch.exp(-m))
            _divide_rows(weights_mm @ v, normaliser + eps, out=h, kernels=kernels)  # (B, H, T, DH), in v's dtype
        if rebuild is not None:
            q = k = v = None  # not kept: rebuild() gives them back in backward
        if kernels is not None:
            # D is rebuilt in backward from a and its running maximum: no T x T tensor besides C is kept
            ctx.save_for_backward(q, k, v, fgate, a, running_max, weights_mm, m, argmax, row_sum, normaliser, h)
        else:
            if low_dtype is not None:
                # Kept for backward in the low dtype too: half the bytes of the two largest saved tensors. Backward
                # uses C in the products anyway, and C and D each once more in a product that is rounded to low
                # precision or summed into a gate gradient (same error bound: tests/test_cell.py).
                weights, decay = weights_mm, decay.to(low_dtype)
            ctx.save_for_backward(q, k, v, fgate, decay, weights, m, argmax, row_sum, normaliser, h)
        ctx.eps, ctx.low_dtype, ctx.kernels, ctx.scale, ctx.rebuild = eps, low_dtype, kernels, scale, rebuild
        ctx.sources = sources if rebuild is not None else None
        return h

    @staticmethod
    def backward(ctx, grad_h, *_):
        kernels, low_dtype = ctx.kernels, ctx.low_dtype
        if kernels is None:
            q, k, v, fgate, decay, weights, m, argmax, row_sum, normaliser, h = ctx.saved_tensors
        else:
            q, k, v, fgate, a, running_max, weights, m, argmax, row_sum, normaliser, h = ctx.saved_tensors
        rebuilt = ctx.rebuild is not None
        sources, ctx.sources = ctx.sources, None
        # The whole backward in one kernel, slice by slice in cache (backward_bf16, backward_fp32 in
        # csrc/mlstm_cpu.cpp), with the gradients written in the layouts q, k, v came in; from q, k, v's sources where
        # forward was given them (backward_*_projected: then rebuild, which would write q, k, v out, is not called).
        source_rows = None if sources is None else (sources.c, sources.x_m, grad_h, h)
        fp32 = sources is not None and _whole_backward_fp32(kernels, source_rows, weights, low_dtype)
        if sources is not None and (fp32 or _whole_backward(kernels, source_rows, weights, low_dtype)) \
                and sources.c.is_contiguous() and sources.x_m.is_contiguous():
            ctx.rebuild = None
            (wq, bq), (wk, bk), (wv, bv) = sources.projections
            if sources.outbox is not None:  # the projections' backward too (see ProjectedSources.outbox)
                B, T, C = sources.c.shape
                grad_c, grad_x_m = (torch.empty(B, T, C, dtype=sources.c.dtype) for _ in range(2))
                with_sources = (kernels.backward_fp32_projected_sources if fp32 else
                                kernels.backward_bf16_projected_sources)
                out = with_sources(
                    sources.c, sources.x_m, sources.num_heads, wq, bq, wk, bk, wv, bv, grad_h, h, weights, a,
                    running_max, m.squeeze(-1), row_sum.squeeze(-1), normaliser.squeeze(-1), ctx.scale, ctx.eps,
                    grad_c, grad_x_m)
                sources.outbox["projection_grads"] = tuple(out[3:])
                grads = [g.view(B, T, sources.num_heads, -1).transpose(1, 2) for g in (grad_c, grad_x_m)]
                return _whole_backward_gradients([grads[0], None, grads[1]], *out[:3], argmax, fgate)
            grads = [torch.empty(h.shape, dtype=h.dtype) if like is None else torch.empty_like(like, device=h.device)
                     for like in ctx.layouts]
            projected_backward = kernels.backward_fp32_projected if fp32 else kernels.backward_bf16_projected
            sums = projected_backward(
                sources.c, sources.x_m, sources.num_heads, wq, bq, wk, bk, wv, bv, grad_h, h, weights, a,
                running_max, m.squeeze(-1), row_sum.squeeze(-1), normaliser.squeeze(-1), ctx.scale, ctx.eps, *grads)
            return _whole_backward_gradients(grads, *sums, argmax, fgate)
        if rebuilt:  # in the dtype they came in (forward kept them otherwise)
            q, k, v = ctx.rebuild()
            ctx.rebuild = None  # (drops the references its closure holds)
        fp32 = _whole_backward_fp32(kernels, (q, k, v, grad_h, h), weights, low_dtype)
        if fp32 or _whole_backward(kernels, (q, k, v, grad_h, h), weights, low_dtype):
            grads = [torch.empty_like(t if like is None else like, device=t.device)
                     for t, like in zip((q, k, v), ctx.layouts)]
            whole_backward = kernels.backward_fp32 if fp32 else kernels.backward_bf16
            sums = whole_backward(q, k, v, grad_h, h, weights, a, running_max, m.squeeze(-1), row_sum.squeeze(-1),
                                  normaliser.squeeze(-1), ctx.scale, ctx.eps, *grads)
            return _whole_backward_gradients(grads, *sums, argmax, fgate)
        if rebuilt:  # contiguous, as forward kept them otherwise
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        denom = normaliser + ctx.eps  # (B, H, T, 1)
        # d h / d (C v), in h's dtype (the products' dtype), contiguous for the products below (grad_h arrives in
        # h's layout, often token-major: this division does the relayout in the same pass)
        grad_num = torch.empty(h.shape, dtype=h.dtype, device=h.device)
        if _fused_division(kernels, grad_h, denom):  # the division and the row dot product below in one pass
            grad_norm = kernels.divide_rows_dot(grad_h, denom.squeeze(-1), grad_num, h).unsqueeze(-1).neg_()
        else:
            _divide_rows(grad_h, denom, out=grad_num)
            # -(dh . h) / denom, from grad_num = dh / denom: (B, H, T, 1), summed in fp32 at least. The products
            # are written to an fp32 buffer (same values as sum(dtype=fp32) of the bf16 products, which would copy
            # them).
            products = torch.mul(grad_num, h, out=torch.empty(h.shape, dtype=denom.dtype, device=h.device))
            grad_norm = products.sum(dim=-1, keepdim=True).neg_()
            del products
        use_sum = row_sum.abs() >= torch.exp(-m)  # which side of max(|sum C|, exp(-m)) is active
        grad_row_sum = torch.where(use_sum, grad_norm * torch.sign(row_sum), 0.0)
        grad_m = torch.where(use_sum, 0.0, -grad_norm * torch.exp(-m))  # (B, H, T, 1)

        mm_dtype = low_dtype or weights.dtype
        weights_mm = weights.to(mm_dtype)
        grad_v = weights_mm.transpose(-2, -1) @ grad_num  # C^T dN
        del weights_mm
        grad_weights = grad_num @ v.transpose(-2, -1)  # (B, H, T, T)
        if kernels is not None:
            # dC = dN v^T + grad_row_sum, dS = dC D', and the row and column sums of d log D = dC C, in one pass
            grad_scores, grad_log_d_rows, grad_igate = kernels.weights_backward(
                grad_weights, grad_row_sum.squeeze(-1).contiguous(), weights, a, running_max, ctx.scale)
            del grad_weights
            grad_m = grad_m.squeeze(-1)  # (B, H, T)
            # m_t = max_s log D[t, s] takes its gradient at the argmax: that adds grad_m - (row sum) to one entry of
            # row t, so the row sums become grad_m and that column gains it
            grad_igate.scatter_add_(-1, argmax.squeeze(-1), grad_m - grad_log_d_rows)  # column sums: +i~_s
            grad_cum = grad_m - grad_igate  # +F_t in row t, -F_s in column s
            grad_q = grad_scores @ k
            grad_k = grad_scores.transpose(-2, -1) @ q
            return _gate_and_layout_gradients(ctx.layouts, grad_q, grad_k, grad_v, grad_igate, grad_cum, fgate)
        if low_dtype is None:
            grad_weights += grad_row_sum
        else:
            grad_weights = torch.add(grad_weights, grad_row_sum)  # back to fp32 in the same pass
        # decay holds D / sqrt(DH); written straight in the products' dtype
        grad_scores = torch.mul(grad_weights, decay, out=torch.empty_like(weights, dtype=mm_dtype))
        grad_log_d = grad_weights.mul_(weights)  # d/d log D of C = S exp(log D - m): dC * C
        grad_m -= grad_log_d.sum(dim=-1, keepdim=True)
        grad_log_d.scatter_add_(-1, argmax, grad_m)  # m_t = max_s log D[t, s] takes its gradient at the argmax
        grad_q = grad_scores @ k
        grad_k = grad_scores.transpose(-2, -1) @ q
        grad_igate = grad_log_d.sum(dim=-2)  # log D[t, s] has +i~_s: column sums. (B, H, T)
        grad_cum = grad_log_d.sum(dim=-1) - grad_igate  # +F_t in row t, -F_s in column s
        return _gate_and_layout_gradients(ctx.layouts, grad_q, grad_k, grad_v, grad_igate, grad_cum, fgate)


def _whole_backward_gradients(grads, grad_m, grad_log_d_rows, grad_igate, argmax, fgate):
    """The cell's gradients from the whole-backward kernel's: q's, k's, v's (written in their layouts) and the sums
    of d log D and the stabiliser's gradient (B, H, T) each, routed to the gates as the kernels' form below does."""
    grad_igate.scatter_add_(-1, argmax.squeeze(-1), grad_m - grad_log_d_rows)  # column sums: +i~_s
    return _gate_and_layout_gradients((None, None, None), *grads, grad_igate, grad_m - grad_igate, fgate)


def _gate_and_layout_gradients(layouts, grad_q, grad_k, grad_v, grad_igate, grad_cum, fgate):
    """The tail of the parallel cell's backward: the forget-gate gradient from d/dF (B, H, T), and q, k, v's
    gradients in the layouts their inputs came in (``layouts``: as ``ctx.layouts``; None where they are in it)."""
    # F = cumsum(log sigmoid f~): reverse cumulative sum, then d log sigmoid(x) / dx = sigmoid(-x)
    grad_log_f = grad_cum.flip(-1).cumsum(-1).flip(-1)
    grad_fgate = grad_log_f * torch.sigmoid(-fgate)
    grad_q, grad_k, grad_v = (grad if like is None else torch.empty_like(like, device=grad.device).copy_(grad)
                              for grad, like in zip((grad_q, grad_k, grad_v), layouts))
    return grad_q, grad_k, grad_v, grad_igate, grad_fgate, None, None, None, None, None, None


def _whole_forward(kernels, q: torch.Tensor, v: torch.Tensor, low_dtype) -> bool:
    """Whether the whole forward runs in one fused kernel (``forward_bf16``): bf16 q and v under autocast, an even
    head dimension, and a CPU with AVX512-BF16 (:func:`vision_lstm.fused.has_bf16_scores`)."""
    return (kernels is not None and low_dtype == torch.bfloat16 and q.dtype == torch.bfloat16
            and v.dtype == torch.bfloat16 and q.shape[-1] % 2 == 0 and fused.has_bf16_scores())


def _whole_backward(kernels, rows, weights, low_dtype) -> bool:
    """Whether the whole backward runs in one fused kernel (``backward_bf16``, ``backward_bf16_projected``): under
    bf16 autocast with the kernels (C kept in bf16, D rebuilt from O(T) vectors), the rows it reads (q, k, v or
    their sources, dh, h) in bf16 with unit last strides, an even head dimension, and a CPU with AVX512-BF16
    (:func:`vision_lstm.fused.has_bf16_scores`)."""
    return (kernels is not None and low_dtype == torch.bfloat16 and weights.dtype == torch.bfloat16
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in rows) and rows[-1].shape[-1] % 2 == 0
            and fused.has_bf16_scores())


def _projected_forward(kernels, q, v, low_dtype, sources: "ProjectedSources") -> bool:
    """Whether the whole forward computes q, k, v from ``sources`` inside its kernel (``forward_bf16_projected`` under
    bf16 autocast, ``forward_fp32_projected`` in fp32): :func:`projected_training_applies`, x_m like c, and the
    whole forward's own conditions (q, v: the placeholders, in the products' dtype)."""
    c, x_m = sources.c, sources.x_m
    if kernels is None or not projected_training_applies(c, sources.num_heads) or x_m.shape != c.shape \
            or x_m.dtype != c.dtype or not x_m.is_contiguous():
        return False
    return c.dtype == torch.float32 if low_dtype is None else _whole_forward(kernels, q, v, low_dtype)


def _whole_forward_fp32(kernels, q, k, v, low_dtype) -> bool:
    """Whether the whole forward runs in one fused kernel in fp32 (``forward_fp32``, on every CPU the kernels build
    on): fp32 q, k, v outside autocast with unit last strides."""
    return (kernels is not None and low_dtype is None
            and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (q, k, v)))


def _whole_backward_fp32(kernels, rows, weights, low_dtype) -> bool:
    """Whether the whole backward runs in one fused kernel in fp32 (``backward_fp32``): outside autocast with the
    kernels (C kept in fp32), the rows it reads (q, k, v, dh, h) in fp32 with unit last strides."""
    return (kernels is not None and low_dtype is None and weights.dtype == torch.float32
            and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in rows))


def _contiguous_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def _layout_of(x: torch.Tensor) -> torch.Tensor:
    """A data-less tensor with x's shape, strides and dtype, for ``empty_like`` (which keeps dense strides)."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def mlstm_parallel(q, k, v, igate, fgate, eps: float = DEFAULT_EPS, rebuild=None,
                   token_major: bool = False, sources: ProjectedSources | None = None) -> torch.Tensor:
    """Parallel form, fast path (hand-written backward). Shapes and math as :func:`mlstm_parallel_reference`.

    Under bf16 autocast (CPU or CUDA) q, k, v are cast to bf16, the gates to fp32, and h comes back in bf16;
    see :class:`_ParallelMLSTM` for which products run in which precision.

    rebuild: None, or a callable that returns (q, k, v) again (same values and layouts, computed without grad);
    given, backward calls it instead of keeping q, k, v from forward (less memory for a little recomputation).

    token_major: return h (B, H, T, DH) as a view of (B, T, H, DH) memory (what a layer that goes on token-major
    reads without a copy) instead of in q's layout.

    sources: None, or (with rebuild) what q, k, v were computed from (:class:`ProjectedSources`): where the whole
    bf16 backward kernel applies, it computes them again slice by slice instead of calling rebuild. With
    ``placeholders``, q, k, v are not computed at all (their shape only): the whole bf16 forward kernel computes
    them from the sources too (:func:`projected_training_applies`), else forward calls rebuild for them.

    Always runs eagerly, also inside ``torch.compile``d models: compiling it with the rest of ViL-T was far slower
    to compile and to train (2 cores, session 16, ad hoc), while the rest of the model compiled around an eager
    cell trains 1.17x faster in bf16 (README, Performance).
    """
    if torch.compiler.is_compiling():
        # The eager wrapper is made here rather than by decorating this function at import: making it imports
        # TorchDynamo, about half of ``import vision_lstm``'s time (1.2 of 2.5 s, session 18), which only users
        # who compile need, and they have imported it by now.
        return torch.compiler.disable(_mlstm_parallel_eager)(q, k, v, igate, fgate, eps, rebuild, token_major,
                                                             sources)
    return _mlstm_parallel_eager(q, k, v, igate, fgate, eps, rebuild, token_major, sources)


def _mlstm_parallel_eager(q, k, v, igate, fgate, eps: float, rebuild=None, token_major: bool = False,
                          sources: ProjectedSources | None = None) -> torch.Tensor:
    _check_inputs(q, k, v, igate, fgate)
    if sources is not None and sources.placeholders and rebuild is None:
        raise ValueError("sources with placeholders need rebuild: q, k, v must be computable where the cell's "
                         "projected kernels do not apply")
    device = q.device.type
    if torch.is_autocast_enabled(device):
        # bf16 has fp32's range; fp16 (CUDA autocast's default) could overflow in C = S D, so it takes fp32.
        low_dtype = torch.get_autocast_dtype(device)
        low_dtype = low_dtype if low_dtype == torch.bfloat16 else None
        with torch.autocast(device, enabled=False):
            dtype = low_dtype or torch.float32
            q, k, v = (t.to(dtype) for t in (q, k, v))
            igate, fgate = igate.float(), fgate.float()
            kernels = _fused_kernels(q, k, v, igate, fgate, low_dtype)
            rebuilt = None if rebuild is None else lambda: tuple(t.to(dtype) for t in rebuild())  # as cast here
            return _ParallelMLSTM.apply(q, k, v, igate, fgate, eps, low_dtype, kernels, rebuilt, token_major,
                                        sources)
    kernels = _fused_kernels(q, k, v, igate, fgate, None)
    return _ParallelMLSTM.apply(q, k, v, igate, fgate, eps, None, kernels, rebuild, token_major, sources)


def projected_training_applies(c: torch.Tensor, num_heads: int) -> bool:
    """Whether the parallel cell, given :class:`ProjectedSources` with placeholders, computes q, k, v from sources like
    c (B, T, H * DH) inside its whole kernels, forward and backward: contiguous CPU tensors, not inside
    ``torch.compile``, and either bf16 with an even head dimension and the fused kernels' AVX512-BF16 forward (under
    bf16 autocast, which the cell checks itself), or fp32 with the fused kernels (every CPU they build on; outside
    autocast)."""
    if not (c.device.type == "cpu" and c.ndim == 3 and c.is_contiguous() and c.shape[1] > 0
            and c.shape[2] % num_heads == 0 and not torch.compiler.is_compiling()):
        return False
    if c.dtype == torch.float32:
        return fused.vector_lanes() > 0  # (0: no kernels)
    return c.dtype == torch.bfloat16 and (c.shape[2] // num_heads) % 2 == 0 and fused.has_bf16_scores()


def projected_form_applies(c: torch.Tensor, num_heads: int) -> bool:
    """Whether :func:`mlstm_parallel_projected` runs for sources like c (B, T, H * DH): no gradients wanted, CPU
    tensors, not inside ``torch.compile``, and either bf16 tensors under bf16 autocast with an even head dimension
    and the fused kernels' AVX512-BF16 forward (:func:`vision_lstm.fused.has_bf16_scores`), or fp32 tensors outside
    autocast with the fused kernels (every CPU they build on)."""
    if torch.is_grad_enabled() or c.device.type != "cpu" or c.ndim != 3 or c.shape[1] == 0 \
            or c.shape[2] % num_heads or torch.compiler.is_compiling():
        return False
    if not torch.is_autocast_enabled("cpu"):
        return c.dtype == torch.float32 and fused.vector_lanes() > 0  # (0: no kernels)
    return (torch.get_autocast_dtype("cpu") == torch.bfloat16 and c.dtype == torch.bfloat16
            and (c.shape[2] // num_heads) % 2 == 0 and fused.has_bf16_scores())


def mlstm_parallel_projected(c, x_m, num_heads: int, projections, igate, fgate, eps: float = DEFAULT_EPS,
                             output=None) -> torch.Tensor:
    """The parallel form for inference with the ViL layer's q, k, v projections inside it: q = Wq c + bq,
    k = Wk c + bk, v = Wv x_m + bv (W block-diagonal), computed per (batch, head) slice inside the fused whole
    forward kernel (bf16 or fp32) and never written to memory, where the projections would write q, k, v out and the
    cell read them back (six passes over (B, T, H * DH) memory per layer).

    c, x_m: (B, T, H * DH) bf16 (under bf16 autocast) or fp32 (outside autocast); projections: ((Wq, bq), (Wk, bk),
    (Wv, bv)) with W (H * DH / bs, bs, bs) and b (H * DH,) or None, in the dtype the products would use (under bf16
    autocast: bf16); igate, fgate: (B, H, T). Returns h (B, H, T, DH) in c's dtype as a view of token-major
    (B, T, H, DH) memory: the same bits as the projections' kernels followed by :func:`mlstm_parallel`
    (``tests/test_fused.py``). Only where :func:`projected_form_applies` (without gradients).

    output: None, or the ViL layer's output path after the cell as (z, norm_weight, norm_bias, skip, norm_eps), z
    (B, T, H * DH) in c's dtype, the others (H * DH,) (norm_bias may be None): then the kernel ends with it and
    returns y = (HeadNorm(h) * (1 + norm_weight) + norm_bias + skip * c) * SiLU(z) (B, T, H * DH) instead of h,
    the bits of the CPU kernels' gated norm on the h above (``layers.gated_head_norm_output``), with h's rows going
    from the kernel's buffers into y (h is never written to memory and read back).
    """
    if not projected_form_applies(c, num_heads):
        raise ValueError("mlstm_parallel_projected runs without gradients on CPU tensors with the fused kernels: fp32 "
                         "outside autocast, or bf16 under bf16 autocast with an even head dimension on a CPU with "
                         "AVX512-BF16 (see projected_form_applies)")
    B, T, inner = c.shape
    DH = inner // num_heads
    if x_m.shape != c.shape or igate.shape != (B, num_heads, T) or fgate.shape != (B, num_heads, T):
        raise ValueError(f"expected x_m with c's shape {tuple(c.shape)} and gates (B, H, T) = {(B, num_heads, T)}, "
                         f"got {tuple(x_m.shape)}, {tuple(igate.shape)} and {tuple(fgate.shape)}")
    with torch.autocast(c.device.type, enabled=False):
        igate, fgate = igate.float(), fgate.float()
        a, running_max, m, _ = _decay_vectors(igate, fgate)
        (wq, bq), (wk, bk), (wv, bv) = projections
        args = (c.contiguous(), x_m.contiguous(), num_heads, wq, bq, wk, bk, wv, bv, a, running_max, m, DH ** -0.5,
                eps)
        if output is not None:
            z, norm_weight, norm_bias, skip, norm_eps = output
            if z.shape != c.shape or z.dtype != c.dtype:
                raise ValueError(f"expected z with c's shape {tuple(c.shape)} and dtype {c.dtype}, got "
                                 f"{tuple(z.shape)} {z.dtype}")
            y = torch.empty_like(args[0])
            gated = (*args, z.contiguous(), norm_weight, norm_bias, skip, norm_eps, y)
            if c.dtype == torch.float32:
                fused.ops().forward_fp32_projected_gated(*gated)
            else:
                fused.ops().forward_bf16_projected_gated(*gated)
            return y
        h = torch.empty(B, T, num_heads, DH, dtype=c.dtype).transpose(1, 2)
        args = (*args, h)
        if c.dtype == torch.float32:
            fused.ops().forward_fp32_projected(*args)
        else:
            fused.ops().forward_bf16_projected(*args)
    return h


def _fused_kernels(q, k, v, igate, fgate, low_dtype):
    """The fused CPU kernels (:mod:`vision_lstm.fused`) where they apply to these inputs, else None: CPU tensors,
    and either bf16 q, k, v under autocast or one dtype (fp32 or fp64) for everything."""
    tensors = (q, k, v, igate, fgate)
    if any(t.device.type != "cpu" for t in tensors) or q.shape[2] == 0:
        return None
    if low_dtype is None:
        if q.dtype not in (torch.float32, torch.float64) or any(t.dtype != q.dtype for t in tensors):
            return None
    elif low_dtype != torch.bfloat16 or igate.dtype != torch.float32:
        return None
    return fused.ops()


def mlstm_step(q, k, v, igate, fgate, state: MLSTMState | None = None, eps: float = DEFAULT_EPS):
    """One recurrent step (xLSTM eqs. 19-27 with the stabiliser of eqs. 15-17).

    q, k, v: (B, H, DH); igate, fgate: (B, H). Returns (h: (B, H, DH), new state).
    """
    B, H, DH = q.shape
    if state is None:
        state = init_state(B, H, DH, dtype=q.dtype, device=q.device)
    log_f = F.logsigmoid(fgate)  # (B, H)
    m = torch.maximum(log_f + state.m, igate)  # (B, H)
    f_scale = torch.exp(log_f + state.m - m)  # (B, H); exactly 0 on the first step (m_0 = -inf)
    i_scale = torch.exp(igate - m)  # (B, H)
    k_scaled = k * (DH ** -0.5)
    C = f_scale[..., None, None] * state.C + i_scale[..., None, None] * (k_scaled[..., :, None] * v[..., None, :])
    n = f_scale[..., None] * state.n + i_scale[..., None] * k_scaled
    numerator = (q[..., None, :] @ C).squeeze(-2)  # (B, H, DH)
    q_dot_n = (q * n).sum(-1, keepdim=True)  # (B, H, 1)
    denominator = torch.maximum(q_dot_n.abs(), torch.exp(-m)[..., None]) + eps
    return numerator / denominator, MLSTMState(C, n, m)


def mlstm_recurrent(q, k, v, igate, fgate, state: MLSTMState | None = None, eps: float = DEFAULT_EPS,
                    return_state: bool = False):
    """Recurrent form: :func:`mlstm_step` over the sequence. Shapes as :func:`mlstm_parallel`.

    Without autograd, memory does not grow with T beyond the output itself. With ``return_state`` also returns
    the final state.
    """
    _check_inputs(q, k, v, igate, fgate)
    B, H, T, _ = q.shape
    # Under autograd the steps' outputs are stacked (writing into one tensor would chain T full-size copies in
    # backward). For inference each step writes into one preallocated output instead: keeping T small tensors
    # alive between the steps' (DH x DH) temporaries fragments the heap (+1.9 GB of RSS measured at 16k tokens).
    stack = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, igate, fgate))
    outputs = [] if stack else torch.empty(B, H, T, v.shape[-1], dtype=torch.promote_types(q.dtype, v.dtype),
                                           device=q.device)
    for t in range(T):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], igate[:, :, t], fgate[:, :, t], state, eps)
        if stack:
            outputs.append(h)
        else:
            outputs[:, :, t] = h
    h = torch.stack(outputs, dim=2) if stack else outputs  # (B, H, T, DH)
    return (h, state) if return_state else h


def mlstm_chunkwise(q, k, v, igate, fgate, chunk_size: int = 64, state: MLSTMState | None = None,
                    eps: float = DEFAULT_EPS, return_state: bool = False):
    """Chunkwise form: parallel inside chunks of ``chunk_size`` tokens, (C, n, m) carried across chunks.

    Shapes as :func:`mlstm_parallel`. Time and memory are O(T * chunk_size + T / chunk_size * DH^2).
    For token t in chunk c with in-chunk cumulative log forget gate b_t, the stabiliser is
    m_t = max(b_t + m_c, max_{s in chunk, s<=t} log D[t, s]), where m_c is the state's stabiliser before the chunk;
    this equals the parallel form's row maximum, so the outputs agree exactly up to rounding.
    """
    _check_inputs(q, k, v, igate, fgate)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    B, H, T, DH = q.shape
    L = min(chunk_size, T)
    pad = (-T) % L
    if pad:
        # Padded tokens carry no input (i~ = -inf) and do not decay the state (log f = 0): they change nothing.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        igate = F.pad(igate, (0, pad), value=float("-inf"))
        fgate = F.pad(fgate, (0, pad), value=float("inf"))
    NC = (T + pad) // L
    scale = DH ** -0.5
    qc, kc, vc = (x.reshape(B, H, NC, L, DH) for x in (q, k, v))
    ic = igate.reshape(B, H, NC, L)
    b = torch.cumsum(F.logsigmoid(fgate).reshape(B, H, NC, L), dim=-1)  # (B, H, NC, L)
    g = b[..., -1]  # (B, H, NC) total log decay of each chunk

    # Contribution of each chunk's own tokens to the state at its end, with a chunk-local stabiliser.
    log_w = g[..., None] - b + ic  # (B, H, NC, L)
    m_local = log_w.amax(dim=-1)  # (B, H, NC)
    w = torch.exp(log_w - m_local[..., None])  # (B, H, NC, L)
    kw = kc * (w[..., None] * scale)  # (B, H, NC, L, DH)
    C_local = kw.transpose(-2, -1) @ vc  # (B, H, NC, DH, DH)
    n_local = kw.sum(dim=-2)  # (B, H, NC, DH)

    # Sequential scan over chunks: NC cheap steps on (DH x DH) states. Keeps the state *before* each chunk.
    if state is None:
        state = init_state(B, H, DH, dtype=q.dtype, device=q.device)
    C_prev, n_prev, m_prev = state
    C_before, n_before, m_before = [], [], []
    for c in range(NC):
        C_before.append(C_prev)
        n_before.append(n_prev)
        m_before.append(m_prev)
        m_new = torch.maximum(g[..., c] + m_prev, m_local[..., c])  # (B, H)
        decay = torch.exp(g[..., c] + m_prev - m_new)[..., None]
        grow = torch.exp(m_local[..., c] - m_new)[..., None]
        C_prev = decay[..., None] * C_prev + grow[..., None] * C_local[:, :, c]
        n_prev = decay * n_prev + grow * n_local[:, :, c]
        m_prev = m_new
    final_state = MLSTMState(C_prev, n_prev, m_prev)
    C_before = torch.stack(C_before, dim=2)  # (B, H, NC, DH, DH)
    n_before = torch.stack(n_before, dim=2)  # (B, H, NC, DH)
    m_before = torch.stack(m_before, dim=2)  # (B, H, NC)

    # Inside each chunk: the parallel form plus the carried state, under one shared stabiliser.
    log_d = b[..., :, None] - b[..., None, :] + ic[..., None, :]  # (B, H, NC, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))
    log_inter = b + m_before[..., None]  # (B, H, NC, L)
    m = torch.maximum(log_d.amax(dim=-1), log_inter)  # (B, H, NC, L)
    inter = torch.exp(log_inter - m)[..., None]  # (B, H, NC, L, 1)
    scores = (qc @ kc.transpose(-2, -1)) * scale * torch.exp(log_d - m[..., None])  # (B, H, NC, L, L)
    numerator = scores @ vc + inter * (qc @ C_before)  # (B, H, NC, L, DH)
    q_dot_n = scores.sum(-1, keepdim=True) + inter * (qc @ n_before[..., None])  # (B, H, NC, L, 1)
    normaliser = torch.maximum(q_dot_n.abs(), torch.exp(-m)[..., None])
    h = (numerator / (normaliser + eps)).reshape(B, H, NC * L, DH)[:, :, :T]
    return (h, final_state) if return_state else h


KERNELS_PREFIX = "kernels:"


def check_mode(mode: str, what: str = "mLSTM mode") -> None:
    """Raise ValueError unless ``mode`` is one of :data:`MODES` or ``"kernels:<name>"`` (an ``mlstm_kernels``
    sequence kernel; whether it is available is checked when it first runs, where it runs)."""
    is_kernel = isinstance(mode, str) and mode.startswith(KERNELS_PREFIX) and len(mode) > len(KERNELS_PREFIX)
    if mode in MODES or is_kernel:
        return
    raise ValueError(f"unknown {what} {mode!r}; expected one of {', '.join(MODES)} or "
                     f"'{KERNELS_PREFIX}<name>' with the name of an mlstm_kernels kernel")


def mlstm_external(q, k, v, igate, fgate, name: str, chunk_size: int = 64, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """The same cell computed by a sequence kernel of the xLSTM authors' ``mlstm_kernels`` package, for example
    ``chunkwise--triton_xl_chunk`` (Triton, CUDA GPUs) or ``chunkwise--native_autograd`` (plain PyTorch).

    An optional backend: the package is imported only here. Chunkwise kernels need a whole number of chunks, so
    the sequence is padded at its end with zero tokens; the cell is causal, so they change no earlier output.
    Shapes as :func:`mlstm_parallel`.

    Kernels of another cell (``*siging*``: a sigmoid input gate instead of the exponential one) are refused: with
    the same weights they give other outputs (97 % apart, measured). Kernels with a hand-written backward (every
    name that does not end in ``autograd``, the Triton ones included) compute the same h, but differentiate it
    with the normaliser and stabiliser held fixed (tests/test_cell.py, tests/test_cuda.py): they warn when used
    with gradients.
    """
    if "siging" in name:
        raise ValueError(f"mlstm_kernels kernel {name!r} computes another cell (a sigmoid input gate instead of the "
                         f"mLSTM's exponential one), so the same weights would give other outputs; use a kernel "
                         f"without 'siging' in its name, e.g. chunkwise--triton_xl_chunk or chunkwise--native_autograd")
    try:
        from mlstm_kernels.torch import get_available_mlstm_kernels, get_mlstm_kernel
    except ImportError:
        raise ValueError(f"mLSTM mode '{KERNELS_PREFIX}{name}' needs the mlstm_kernels package: "
                         f"pip install mlstm_kernels (or use mode parallel or chunkwise)") from None
    available = get_available_mlstm_kernels()
    if name not in available:
        raise ValueError(f"mlstm_kernels has no kernel {name!r} here; available: {', '.join(available)} "
                         f"(the Triton kernels need a CUDA GPU and the triton package). A model can switch to "
                         f"another form with the same weights: model.set_mlstm_mode('parallel')")
    if not name.endswith("autograd") and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q, k, v, igate, fgate)):
        warnings.warn(f"mlstm_kernels kernel {name!r} has a hand-written backward that holds the normaliser and the "
                      f"stabiliser fixed: its q, k and gate gradients differ from the exact gradient of h (by 0.9-1.4 "
                      f"relative for the Triton kernel, measured on an H200), so training follows another direction. "
                      f"For exact gradients use mode 'parallel' or 'chunkwise', or a kernel whose name ends in "
                      f"'autograd'.", stacklevel=2)
    kernel = get_mlstm_kernel(name)
    T = q.shape[2]
    pad = (-T) % chunk_size if name.startswith("chunkwise") else 0
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        igate, fgate = F.pad(igate, (0, pad)), F.pad(fgate, (0, pad))
    kwargs = {"chunk_size": chunk_size} if name.startswith("chunkwise") else {}
    h = kernel(q.contiguous(), k.contiguous(), v.contiguous(), igate.contiguous(), fgate.contiguous(), eps=eps,
               **kwargs)
    return h[:, :, :T] if pad else h


def mlstm(q, k, v, igate, fgate, mode: str = "parallel", chunk_size: int = 64, eps: float = DEFAULT_EPS,
          rebuild=None, token_major: bool = False, sources: ProjectedSources | None = None):
    """Dispatch to one of the three forms, or to an ``mlstm_kernels`` kernel (mode ``"kernels:<name>"``,
    :func:`mlstm_external`). Shapes as :func:`mlstm_parallel`. ``rebuild``, ``token_major`` and ``sources`` (see
    :func:`mlstm_parallel`) apply to the parallel form; the others keep what autograd keeps and return h in their
    own layout."""
    if mode == "parallel":
        return mlstm_parallel(q, k, v, igate, fgate, eps=eps, rebuild=rebuild, token_major=token_major,
                              sources=sources)
    if mode == "chunkwise":
        return mlstm_chunkwise(q, k, v, igate, fgate, chunk_size=chunk_size, eps=eps)
    if mode == "recurrent":
        return mlstm_recurrent(q, k, v, igate, fgate, eps=eps)
    check_mode(mode)
    return mlstm_external(q, k, v, igate, fgate, mode[len(KERNELS_PREFIX):], chunk_size=chunk_size, eps=eps)
