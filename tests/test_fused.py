"""The fused CPU kernels (vision_lstm.fused: the parallel cell, csrc/mlstm_cpu.cpp; the layer's block-diagonal
projections, csrc/blockdiag_cpu.cpp; its conv + SiLU and output path, csrc/layer_cpu.cpp): they build where a C++
compiler is, compute what the PyTorch form computes, and the cell falls back to that form when they cannot build.
Cell-level agreement (outputs and gradients, fused and PyTorch form, float64 / float32 / bf16 autocast) is in
tests/test_cell.py (the ``cell_path`` fixture and the ``parallel-pytorch`` form)."""
import shutil
from pathlib import Path
import warnings

import pytest
import torch

from vision_lstm import fused, runtime
from vision_lstm.cell import _LOG_DECAY_FLOOR, mlstm_parallel, mlstm_parallel_reference


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("VIL_FUSED", "1")
    ops = fused.ops()
    if ops is None:
        pytest.skip("the fused kernels could not be built here (test_fused_kernels_build_where_a_compiler_is says why)")
    return ops


def test_fused_kernels_build_where_a_compiler_is(monkeypatch):
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: the cell uses its PyTorch form")
    monkeypatch.setenv("VIL_FUSED", "1")
    built = fused._build()
    assert not isinstance(built, Exception), f"the fused kernels failed to build: {built!r}"
    assert fused.ops() is not None


def test_another_checkout_of_the_same_source_reuses_the_build(kernels, tmp_path):
    # ninja rebuilds when the source's path changes: a second checkout (or benchmarks/ab.py's exported revision)
    # must load the cached build, not recompile it (which took 20 s per import before the source was copied into
    # the build folder).
    import os
    import subprocess
    import sys
    from torch.utils import cpp_extension
    build_dir = Path(cpp_extension._get_build_directory(f"vision_lstm_cpu_{fused._cpu_signature()}", verbose=False))
    built = {so: so.stat().st_mtime_ns for so in build_dir.glob("*.so")}
    assert built
    copy = tmp_path / "src"
    shutil.copytree(Path(fused.__file__).parents[1], copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from vision_lstm import fused; assert fused.ops() is not None; print(fused.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(copy), "VIL_FUSED": "1"},
                         capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().startswith(str(copy)) and "compiling" not in out.stderr
    assert {so: so.stat().st_mtime_ns for so in build_dir.glob("*.so")} == built


def _decay_inputs(B, H, T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64)
    a = torch.randn(B, H, T, generator=g, dtype=torch.float64).mul(4).cumsum(-1)  # reaches below the -60 floor
    row_max = torch.cummax(a, dim=-1).values
    return scores.to(dtype), a.to(dtype), row_max.contiguous().to(dtype)


def _weights_want(scores, a, row_max, scale):  # float64, written plainly
    x = (a.double()[..., None, :] - row_max.double()[..., :, None]).clamp_min(_LOG_DECAY_FLOOR)
    causal = torch.ones(x.shape[-1], x.shape[-1], dtype=torch.bool).tril()
    return torch.where(causal, scores.double() * x.exp() * scale, 0.0)


@pytest.mark.parametrize("T,DH", [(1, 2), (5, 8), (17, 34), (49, 32), (64, 96), (100, 16)])
@pytest.mark.parametrize("tiles", [True, False], ids=["amx-tiles", "dot-products"])
def test_bf16_scores_kernel_matches_the_fp32_scores_path(kernels, T, DH, tiles):
    """weights_forward_qk (S = q k^T from bf16 rows, summed in fp32, then C = S D' and its row sums) against the
    fp32 scores of the upcast rows fed to weights_forward: the same products, summed in another order, so C
    (rounded to bf16) may differ by one bf16 unit in rare entries and the row sums by fp32 rounding. q and k are
    head views of token-major memory (read in place). Both forms of the kernel: AMX tiles (ATen's brgemm) and the
    AVX512-BF16 dot products."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell computes the scores with PyTorch")
    if tiles and not kernels.has_tile_scores():
        pytest.skip("this CPU has no AMX tiles: the kernel uses its dot products")
    B, H = 2, 3
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(B, T, H * DH, generator=g).bfloat16().view(B, T, H, DH).transpose(1, 2) for _ in range(2))
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    scale = DH ** -0.5
    scores = q.float() @ k.float().transpose(-2, -1)
    want = torch.empty(B, H, T, T, dtype=torch.bfloat16)
    want_sum = kernels.weights_forward(scores, a, row_max, scale, want)
    got = torch.full_like(want, float("nan"))  # every entry must be written, zeros above the diagonal included
    got_sum = kernels.weights_forward_qk(q, k, a, row_max, scale, got, tiles)
    assert not got.isnan().any()
    ulp = want.float().abs().clamp_min(1e-30) * 2.0 ** -7
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).float().mean() <= 1e-3
    assert torch.allclose(got_sum, want_sum, rtol=1e-5, atol=1e-5 * float(want_sum.abs().max()))
    assert torch.equal(got.float().triu(1), torch.zeros_like(got.float()))


def test_bf16_scores_kernel_rejects_bad_input(kernels):
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    _, a, row_max = _decay_inputs(1, 1, 4)
    out = torch.empty(1, 1, 4, 4, dtype=torch.bfloat16)
    odd = torch.randn(1, 1, 4, 3).bfloat16()
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        kernels.weights_forward_qk(odd, odd, a, row_max, 1.0, out)
    fp32 = torch.randn(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernels.weights_forward_qk(fp32, fp32, a, row_max, 1.0, out)


@pytest.mark.parametrize("T,DH", [(1, 2), (5, 8), (17, 34), (49, 32), (64, 96), (100, 16), (33, 64)])
@pytest.mark.parametrize("tiles", [True, False], ids=["amx-tiles", "dot-products"])
def test_whole_forward_matches_its_parts(kernels, T, DH, tiles):
    """forward_bf16 (the cell's whole bf16 forward in one kernel) against the scores kernel for C and its row sums
    (the same products and epilogue: equal), the normaliser max(|row sum|, exp(-m)), and h against
    (C v) / (n + eps) in float64 from the same bf16 C, rounded to bf16: C v is summed in fp32 in the kernel, so h
    may differ by one bf16 unit in rare entries. q, k, v and h are head views of token-major memory. Both forms:
    AMX tiles (ATen's brgemm) and the AVX512-BF16 dot products."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell's forward runs as separate products")
    if tiles and not fused.has_tile_scores():
        pytest.skip("this CPU has no AMX tiles: the kernel uses its dot products")
    B, H = 2, 3
    g = torch.Generator().manual_seed(T + DH)
    q, k, v = (torch.randn(B, T, H * DH, generator=g).bfloat16().view(B, T, H, DH).transpose(1, 2) for _ in range(3))
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - torch.rand(B, H, T, generator=g)  # any stabiliser; exp(-m) wins the maximum in some rows
    scale, eps = DH ** -0.5, 1e-6
    want_c = torch.empty(B, H, T, T, dtype=torch.bfloat16)
    want_sum = kernels.weights_forward_qk(q, k, a, row_max, scale, want_c, tiles)
    got_c = torch.full_like(want_c, float("nan"))
    h = torch.full((B, T, H, DH), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    got_sum, got_norm = kernels.forward_bf16(q, k, v, a, row_max, m, scale, eps, got_c, h, tiles)
    assert torch.equal(got_c, want_c) and torch.equal(got_sum, want_sum)
    want_norm = torch.maximum(want_sum.abs(), torch.exp(-m))
    assert torch.allclose(got_norm, want_norm, rtol=1e-6, atol=0)
    want_h = ((want_c.double() @ v.double()) / (want_norm.double() + eps)[..., None]).bfloat16()
    assert not h.isnan().any()
    ulp = want_h.double().abs().clamp_min(1e-30) * 2.0 ** -7
    assert ((h.double() - want_h.double()).abs() <= ulp).all()
    assert (h != want_h).float().mean() <= 2e-3
    h_alone = torch.empty_like(h)  # without C written out (inference): the same h
    kernels.forward_bf16(q, k, v, a, row_max, m, scale, eps, None, h_alone, tiles)
    assert torch.equal(h_alone, h)


def test_whole_forward_rejects_bad_input(kernels):
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    _, a, row_max = _decay_inputs(1, 1, 4)
    x = torch.randn(1, 1, 4, 4).bfloat16()
    with pytest.raises(RuntimeError, match="v must be a bfloat16"):
        kernels.forward_bf16(x, x, x.float(), a, row_max, row_max, 1.0, 1e-6, None, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="h must have shape"):
        kernels.forward_bf16(x, x, x, a, row_max, row_max, 1.0, 1e-6, None, torch.empty(1, 1, 5, 4).bfloat16())
    with pytest.raises(RuntimeError, match="weights has 4 elements"):
        kernels.forward_bf16(x, x, x, a, row_max, row_max, 1.0, 1e-6, torch.empty(4).bfloat16(), torch.empty_like(x))
    odd = torch.randn(1, 1, 4, 3).bfloat16()
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        kernels.forward_bf16(odd, odd, odd, a, row_max, row_max, 1.0, 1e-6, None, torch.empty_like(odd))


def _whole_backward_want(q, k, v, grad_h, h, c, a, row_max, m, row_sum, normaliser, scale, eps, round_dn=True):
    """The cell's backward from the forward's C, in float64, written plainly (eqs. 59-64 differentiated):
    (dq, dk, dv, grad_m, the row and the column sums of d log D). With round_dn, dN = dh / (n + eps) is rounded to
    bf16, as the cell's bf16 products take it (in both of its forms): its rounding, amplified where dC = dN v^T +
    grad_row_sum cancels, would otherwise dominate the comparison (1.2 % in the sums of d log D at T 17, DH 34)."""
    q, k, v, grad_h, h, c = (t.double() for t in (q, k, v, grad_h, h, c))
    grad_num = grad_h / (normaliser.double() + eps)[..., None]  # dN
    if round_dn:
        grad_num = grad_num.bfloat16().double()  # as the bf16 cell rounds it
    grad_norm = -(grad_num * h).sum(-1)
    floor = torch.exp(-m.double())
    use_sum = row_sum.double().abs() >= floor
    grad_row_sum = torch.where(use_sum, grad_norm * torch.sign(row_sum.double()), 0.0)
    grad_m = torch.where(use_sum, 0.0, -grad_norm * floor)
    grad_c = grad_num @ v.transpose(-2, -1) + grad_row_sum[..., None]
    grad_scores = grad_c * _weights_want(torch.ones_like(c), a, row_max, scale)  # dC D'
    grad_log_d = grad_c * c
    return (grad_scores @ k, grad_scores.transpose(-2, -1) @ q, c.transpose(-2, -1) @ grad_num, grad_m,
            grad_log_d.sum(-1), grad_log_d.sum(-2))


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("T,DH", [(1, 2), (5, 8), (17, 34), (49, 32), (64, 96), (100, 16), (33, 64)])
def test_whole_backward_matches_float64(kernels, T, DH):
    """backward_bf16 (the cell's whole bf16 backward in one kernel, slice by slice) against the backward in float64
    from the same bf16 inputs, the forward's bf16 C and dN rounded to bf16: dq, dk, dv within bf16's rounding of
    dS and of themselves (relative norm 5e-3; measured at most 3e-3), grad_m and the sums of d log D within 1e-3
    (measured at most 6e-5), gradients written into head views of token-major memory. Both forms (AMX
    tiles, AVX512-BF16 dot products over the triangles) agree with each other to fp32 summation order (they round
    dS from the same fp32 sums, except in near-ties)."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell's backward runs as separate products")
    B, H = 2, 3
    g = torch.Generator().manual_seed(T + DH)
    q, k, v, grad_h = (torch.randn(B, T, H * DH, generator=g).bfloat16().view(B, T, H, DH).transpose(1, 2)
                       for _ in range(4))
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - 3 * torch.rand(B, H, T, generator=g)  # exp(-m) wins the normaliser's maximum in some rows
    scale, eps = DH ** -0.5, 1e-6
    c = torch.empty(B, H, T, T, dtype=torch.bfloat16)
    h = torch.empty(B, T, H, DH, dtype=torch.bfloat16).transpose(1, 2)
    row_sum, normaliser = kernels.forward_bf16(q, k, v, a, row_max, m, scale, eps, c, h, True)
    if T >= 17:  # both sides of max(|row sum|, exp(-m)) are exercised
        use_sum = row_sum.abs() >= torch.exp(-m)
        assert use_sum.any() and not use_sum.all()
    want = _whole_backward_want(q, k, v, grad_h, h, c, a, row_max, m, row_sum, normaliser, scale, eps)
    results = {}
    for tiles in ([True, False] if fused.has_tile_scores() else [False]):
        grads = [torch.full((B, T, H, DH), float("nan"), dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
        sums = kernels.backward_bf16(q, k, v, grad_h, h, c, a, row_max, m, row_sum, normaliser, scale, eps, *grads,
                                     tiles)
        got = (*grads, *sums)
        errors = [_rel(x, y) for x, y in zip(got, want)]
        assert max(errors[:3]) <= 5e-3 and max(errors[3:]) <= 1e-3, (tiles, errors)
        results[tiles] = got
    if len(results) == 2:
        assert max(_rel(x, y.double()) for x, y in zip(results[True], results[False])) <= 1e-3


def test_whole_backward_rejects_bad_input(kernels):
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    _, a, row_max = _decay_inputs(1, 1, 4)
    x = torch.randn(1, 1, 4, 4).bfloat16()
    c = torch.zeros(1, 1, 4, 4).bfloat16()
    outs = [torch.empty_like(x) for _ in range(3)]
    with pytest.raises(RuntimeError, match="grad_h must be a bfloat16"):
        kernels.backward_bf16(x, x, x, x.float(), x, c, a, row_max, a, a, a, 1.0, 1e-6, *outs)
    with pytest.raises(RuntimeError, match="grad_k must have shape"):
        kernels.backward_bf16(x, x, x, x, x, c, a, row_max, a, a, a, 1.0, 1e-6, outs[0], x[..., :3, :], outs[2])
    with pytest.raises(RuntimeError, match="weights has 8 elements"):
        kernels.backward_bf16(x, x, x, x, x, c[..., :2].contiguous(), a, row_max, a, a, a, 1.0, 1e-6, *outs)
    with pytest.raises(RuntimeError, match="normaliser must be float32"):
        kernels.backward_bf16(x, x, x, x, x, c, a, row_max, a, a, a.double(), 1.0, 1e-6, *outs)
    odd = torch.randn(1, 1, 4, 3).bfloat16()
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        kernels.backward_bf16(odd, odd, odd, odd, odd, c, a, row_max, a, a, a, 1.0, 1e-6,
                              *[torch.empty_like(odd) for _ in range(3)])


@pytest.mark.parametrize("T,DH", [(1, 2), (5, 8), (17, 34), (49, 32), (64, 96), (100, 16), (33, 7)])
def test_whole_fp32_kernels_match_float64(kernels, T, DH):
    """forward_fp32 and backward_fp32 (the cell's whole forward and backward in fp32, slice by slice in cache, on
    every CPU the kernels build on) against the cell written plainly in float64 from the same fp32 inputs: h, C, the
    row sums and the normaliser, then dq, dk, dv and grad_m, all within fp32 summation error (relative norm 1e-5;
    measured below 3e-6), and the sums of d log D, whose terms cancel, within 1e-4 (measured at most 4.5e-5). Rows are
    head views of token-major memory, read and written in place; odd T and DH exercise the padded tiles; both sides of
    max(|row sum|, exp(-m)) are exercised."""
    B, H = 2, 3
    g = torch.Generator().manual_seed(T + DH)
    q, k, v, grad_h = (torch.randn(B, T, H * DH, generator=g).view(B, T, H, DH).transpose(1, 2) for _ in range(4))
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - 3 * torch.rand(B, H, T, generator=g)
    scale, eps = DH ** -0.5, 1e-6
    c = torch.full((B, H, T, T), float("nan"))
    h = torch.full((B, T, H, DH), float("nan")).transpose(1, 2)
    row_sum, normaliser = kernels.forward_fp32(q, k, v, a, row_max, m, scale, eps, c, h)
    want_c = _weights_want(q.double() @ k.double().transpose(-2, -1), a, row_max, scale)
    want_row_sum = want_c.sum(-1)
    want_normaliser = torch.maximum(want_row_sum.abs(), torch.exp(-m.double()))
    want_h = (want_c @ v.double()) / (want_normaliser + eps)[..., None]
    for got, want in ((c, want_c), (row_sum, want_row_sum), (normaliser, want_normaliser), (h, want_h)):
        assert _rel(got, want) <= 1e-5
    if T >= 17:
        use_sum = row_sum.abs() >= torch.exp(-m)
        assert use_sum.any() and not use_sum.all()
    want = _whole_backward_want(q, k, v, grad_h, h, c, a, row_max, m, row_sum, normaliser, scale, eps,
                                round_dn=False)
    grads = [torch.full((B, T, H, DH), float("nan")).transpose(1, 2) for _ in range(3)]
    sums = kernels.backward_fp32(q, k, v, grad_h, h, c, a, row_max, m, row_sum, normaliser, scale, eps, *grads)
    errors = [_rel(x, y) for x, y in zip((*grads, *sums), want)]
    assert max(errors[:4]) <= 1e-5 and max(errors[4:]) <= 1e-4, errors
    # without C (inference): the same h
    h2 = torch.empty_like(h)
    kernels.forward_fp32(q, k, v, a, row_max, m, scale, eps, None, h2)
    assert torch.equal(h2, h)


def test_whole_fp32_kernels_reject_bad_input(kernels):
    _, a, row_max = _decay_inputs(1, 1, 4)
    x = torch.randn(1, 1, 4, 4)
    c = torch.zeros(1, 1, 4, 4)
    outs = [torch.empty_like(x) for _ in range(3)]
    with pytest.raises(RuntimeError, match="v must be a float32"):
        kernels.forward_fp32(x, x, x.bfloat16(), a, row_max, row_max, 1.0, 1e-6, None, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="h must have a unit last stride"):
        kernels.forward_fp32(x, x, x, a, row_max, row_max, 1.0, 1e-6, None, torch.empty_like(x).transpose(2, 3))
    with pytest.raises(RuntimeError, match="weights must be float32"):
        kernels.forward_fp32(x, x, x, a, row_max, row_max, 1.0, 1e-6, c.double(), torch.empty_like(x))
    with pytest.raises(RuntimeError, match="grad_k must have shape"):
        kernels.backward_fp32(x, x, x, x, x, c, a, row_max, a, a, a, 1.0, 1e-6, outs[0], x[..., :3, :], outs[2])
    with pytest.raises(RuntimeError, match="weights has 8 elements"):
        kernels.backward_fp32(x, x, x, x, x, c[..., :2].contiguous(), a, row_max, a, a, a, 1.0, 1e-6, *outs)
    with pytest.raises(RuntimeError, match="row_sum must be float32"):
        kernels.backward_fp32(x, x, x, x, x, c, a, row_max, a, a.double(), a, 1.0, 1e-6, *outs)


def _projected_heads(kernels, c, x_m, num_heads, bs, with_bias, generator):
    """Random bf16 block-diagonal weights (C / bs, bs, bs) and biases (C,) (or None) for q, k, v, and q, k, v
    (B, H, T, DH) from c, c, x_m (B, T, C) written out by block_diag_mm: (weights, biases, heads)."""
    B, T, C = c.shape
    weights = [(torch.randn(C // bs, bs, bs, generator=generator) / bs).bfloat16() for _ in range(3)]
    biases = [torch.randn(C, generator=generator).bfloat16() if with_bias else None for _ in range(3)]
    heads = []
    for source, weight, bias in zip((c, c, x_m), weights, biases):
        out = torch.empty(B, num_heads, T, C // num_heads, dtype=torch.bfloat16)
        kernels.block_diag_mm([source.view(B, T, num_heads, -1)], [weight], bias, out.transpose(1, 2))
        heads.append(out)
    return weights, biases, heads


@pytest.mark.parametrize("T,DH,bs,with_bias", [(1, 2, 1, True), (17, 34, 2, False), (64, 96, 4, True),
                                               (33, 64, 8, True), (5, 16, 16, False)])
@pytest.mark.parametrize("tiles", [True, False], ids=["amx-tiles", "dot-products"])
def test_projected_forward_is_the_projections_then_the_whole_forward(kernels, T, DH, bs, with_bias, tiles):
    """forward_bf16_projected (inference: q = Wq c + bq, k = Wk c + bk, v = Wv x_m + bv computed per slice inside
    the cell's forward) against block_diag_mm writing q, k, v out and forward_bf16 reading them: the same sums,
    rounded the same way, so the same bits; block sizes 1-16, heads with a shorter last vector, with and without
    biases."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell's forward runs as separate products")
    if tiles and not fused.has_tile_scores():
        pytest.skip("this CPU has no AMX tiles: the kernel uses its dot products")
    B, H = 2, 3
    C = H * DH
    g = torch.Generator().manual_seed(T + DH + bs)
    c, x_m = (torch.randn(B, T, C, generator=g).bfloat16() for _ in range(2))
    weights, biases, heads = _projected_heads(kernels, c, x_m, H, bs, with_bias, g)
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - torch.rand(B, H, T, generator=g)
    scale, eps = DH ** -0.5, 1e-6
    want = torch.full((B, T, H, DH), float("nan"), dtype=torch.bfloat16).transpose(1, 2)
    want_sum, want_norm = kernels.forward_bf16(*heads, a, row_max, m, scale, eps, None, want, tiles)
    got = torch.full_like(want, float("nan"))
    got_sum, got_norm = kernels.forward_bf16_projected(c, x_m, H, weights[0], biases[0], weights[1], biases[1],
                                                       weights[2], biases[2], a, row_max, m, scale, eps, got, tiles)
    assert not want.isnan().any()
    assert torch.equal(got, want) and torch.equal(got_sum, want_sum) and torch.equal(got_norm, want_norm)


@pytest.mark.parametrize("T,DH,bs,with_bias", [(1, 2, 1, True), (17, 34, 2, False), (64, 96, 4, True),
                                               (33, 64, 8, True), (5, 16, 16, False)])
def test_projected_backward_is_the_projections_then_the_whole_backward(kernels, T, DH, bs, with_bias):
    """backward_bf16_projected (training: q, k, v computed per slice inside the whole backward from their sources,
    as forward_bf16_projected computes them) against block_diag_mm writing q, k, v out and backward_bf16 reading
    them: the same bits. And forward_bf16_projected with C written out (training) gives forward_bf16's C. Both forms
    of the products where the CPU has them."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell's backward runs as separate products")
    B, H = 2, 3
    C = H * DH
    g = torch.Generator().manual_seed(T + DH + bs + 1)
    c, x_m, grad_h = (torch.randn(B, T, C, generator=g).bfloat16() for _ in range(3))
    grad_h = grad_h.view(B, T, H, DH).transpose(1, 2)
    weights, biases, heads = _projected_heads(kernels, c, x_m, H, bs, with_bias, g)
    projections = [weights[0], biases[0], weights[1], biases[1], weights[2], biases[2]]
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - 3 * torch.rand(B, H, T, generator=g)
    scale, eps = DH ** -0.5, 1e-6
    for tiles in ([True, False] if fused.has_tile_scores() else [False]):
        weights_c = torch.empty(B, H, T, T, dtype=torch.bfloat16)
        h = torch.empty(B, T, H, DH, dtype=torch.bfloat16).transpose(1, 2)
        row_sum, normaliser = kernels.forward_bf16(*heads, a, row_max, m, scale, eps, weights_c, h, tiles)
        projected_c = torch.full_like(weights_c, float("nan"))
        got_sum, got_norm = kernels.forward_bf16_projected(c, x_m, H, *projections, a, row_max, m, scale, eps,
                                                           torch.empty_like(h), tiles, projected_c)
        assert torch.equal(projected_c, weights_c) and torch.equal(got_sum, row_sum)
        want = [torch.empty(B, H, T, DH, dtype=torch.bfloat16) for _ in range(3)]
        want_sums = kernels.backward_bf16(*heads, grad_h, h, weights_c, a, row_max, m, row_sum, normaliser, scale,
                                          eps, *want, tiles)
        got = [torch.full((B, H, T, DH), float("nan"), dtype=torch.bfloat16) for _ in range(3)]
        got_sums = kernels.backward_bf16_projected(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m,
                                                   row_sum, normaliser, scale, eps, *got, tiles)
        assert not any(t.isnan().any() for t in want)
        for x, y in zip((*got, *got_sums), (*want, *want_sums)):
            assert torch.equal(x, y), tiles


def _fp32_projected_inputs(B, H, T, DH, bs, with_bias, seed):
    """fp32 sources c, x_m (B, T, H * DH), grad_h (B, H, T, DH) head views, block-diagonal weights and biases (or
    None) for q, k, v, and the cell's decay inputs: (c, x_m, grad_h, weights, biases, a, row_max, m). Skips blocks
    wider than this build's vectors."""
    if bs > fused.vector_lanes():
        pytest.skip(f"{bs}-channel blocks are wider than this build's {fused.vector_lanes()}-lane vectors")
    C = H * DH
    g = torch.Generator().manual_seed(seed)
    c, x_m, grad_h = (torch.randn(B, T, C, generator=g) for _ in range(3))
    grad_h = grad_h.view(B, T, H, DH).transpose(1, 2)
    weights = [torch.randn(C // bs, bs, bs, generator=g) / bs for _ in range(3)]
    biases = [torch.randn(C, generator=g) if with_bias else None for _ in range(3)]
    _, a, row_max = _decay_inputs(B, H, T, seed=T)
    m = row_max - 3 * torch.rand(B, H, T, generator=g)
    return c, x_m, grad_h, weights, biases, a, row_max, m


@pytest.mark.parametrize("T,DH,bs,with_bias", [(1, 2, 1, True), (17, 34, 2, False), (64, 96, 4, True),
                                               (33, 64, 8, True), (5, 16, 16, False), (7, 12, 4, False)])
def test_fp32_projected_kernels_are_the_projections_then_the_whole_kernels(kernels, T, DH, bs, with_bias):
    """forward_fp32_projected and backward_fp32_projected (q, k, v computed per slice inside the fp32 whole kernels
    from c and x_m) against block_diag_mm writing q, k, v out and forward_fp32 / backward_fp32 reading them: the
    same sums, so the same bits, for h, C, the row sums and normaliser, the three gradients and the gate sums.
    Block sizes up to this build's vector width, heads with a shorter last vector (DH 34, 12), with and without
    biases."""
    B, H = 2, 3
    C = H * DH
    c, x_m, grad_h, weights, biases, a, row_max, m = _fp32_projected_inputs(B, H, T, DH, bs, with_bias,
                                                                             T + DH + bs + 2)
    heads = []
    for source, weight, bias in zip((c, c, x_m), weights, biases):
        out = torch.empty(B, H, T, DH)
        kernels.block_diag_mm([source.view(B, T, H, DH)], [weight], bias, out.transpose(1, 2))
        heads.append(out)
    projections = [weights[0], biases[0], weights[1], biases[1], weights[2], biases[2]]
    scale, eps = DH ** -0.5, 1e-6
    weights_c = torch.empty(B, H, T, T)
    h = torch.empty(B, T, H, DH).transpose(1, 2)
    row_sum, normaliser = kernels.forward_fp32(*heads, a, row_max, m, scale, eps, weights_c, h)
    got_c = torch.full_like(weights_c, float("nan"))
    got_h = torch.full_like(h, float("nan"))
    got_sum, got_norm = kernels.forward_fp32_projected(c, x_m, H, *projections, a, row_max, m, scale, eps, got_h,
                                                       got_c)
    assert not h.isnan().any()
    for x, y in ((got_h, h), (got_c, weights_c), (got_sum, row_sum), (got_norm, normaliser)):
        assert torch.equal(x, y)
    got_h = torch.full_like(h, float("nan"))  # inference: no C written, the same h
    kernels.forward_fp32_projected(c, x_m, H, *projections, a, row_max, m, scale, eps, got_h)
    assert torch.equal(got_h, h)
    want = [torch.empty(B, H, T, DH) for _ in range(3)]
    want_sums = kernels.backward_fp32(*heads, grad_h, h, weights_c, a, row_max, m, row_sum, normaliser, scale, eps,
                                      *want)
    got = [torch.full((B, H, T, DH), float("nan")) for _ in range(3)]
    got_sums = kernels.backward_fp32_projected(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m, row_sum,
                                               normaliser, scale, eps, *got)
    assert not any(t.isnan().any() for t in want)
    for x, y in zip((*got, *got_sums), (*want, *want_sums)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("T,DH,bs,with_bias", [(1, 2, 1, True), (17, 34, 2, False), (64, 96, 4, True),
                                               (33, 64, 8, True), (5, 16, 16, False), (7, 12, 4, False)])
def test_fp32_projected_backward_can_take_the_projections_backward(kernels, T, DH, bs, with_bias):
    """backward_fp32_projected_sources (the cell's backward that also takes the q, k, v projections' backward from
    each slice's gradients in cache) against backward_fp32_projected's q, k, v gradients put through the dense
    block-diagonal products in float64: c's gradient Wq^T dq + Wk^T dk, x_m's Wv^T dv, the weights' per-block outer
    sums and the biases' column sums, within fp32 rounding of their sums; the gate sums are the same bits."""
    B, H = 3, 3
    C = H * DH
    c, x_m, grad_h, weights, biases, a, row_max, m = _fp32_projected_inputs(B, H, T, DH, bs, with_bias,
                                                                             T + DH + bs + 3)
    projections = [weights[0], biases[0], weights[1], biases[1], weights[2], biases[2]]
    scale, eps = DH ** -0.5, 1e-6
    weights_c = torch.empty(B, H, T, T)
    h = torch.empty(B, T, H, DH).transpose(1, 2)
    row_sum, normaliser = kernels.forward_fp32_projected(c, x_m, H, *projections, a, row_max, m, scale, eps, h,
                                                         weights_c)
    head_grads = [torch.empty(B, H, T, DH) for _ in range(3)]
    want_sums = kernels.backward_fp32_projected(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m, row_sum,
                                                normaliser, scale, eps, *head_grads)
    grad_c, grad_x_m = (torch.full((B, T, C), float("nan")) for _ in range(2))
    got = kernels.backward_fp32_projected_sources(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m,
                                                  row_sum, normaliser, scale, eps, grad_c, grad_x_m)
    assert len(got) == 9
    for x, y in zip(got[:3], want_sums):
        assert torch.equal(x, y)
    dq, dk, dv = (t.transpose(1, 2).reshape(-1, C).double() for t in head_grads)
    dense = [_block_dense(w) for w in weights]
    rows_c, rows_x = c.double().view(-1, C), x_m.double().view(-1, C)
    for got_x, want_x, bound in ((grad_c, dq @ dense[0] + dk @ dense[1], dq.abs() @ dense[0].abs()
                                  + dk.abs() @ dense[1].abs()),
                                 (grad_x_m, dv @ dense[2], dv.abs() @ dense[2].abs())):
        assert ((got_x.view(-1, C).double() - want_x).abs() <= 1e-6 * bound + 1e-30).all()
    for p, (grad, source) in enumerate(((dq, rows_c), (dk, rows_c), (dv, rows_x))):
        grad_w, grad_b = got[3 + 2 * p], got[4 + 2 * p]
        assert grad_w.shape == (C // bs, bs, bs) and grad_b.shape == (C,)
        blocks = (grad.view(-1, C // bs, bs), source.view(-1, C // bs, bs))
        want_w = torch.einsum("nbo,nbi->boi", *blocks)
        bound_w = torch.einsum("nbo,nbi->boi", *(t.abs() for t in blocks))
        assert ((grad_w.double() - want_w).abs() <= 1e-6 * bound_w + 1e-30).all()
        assert ((grad_b.double() - grad.sum(0)).abs() <= 1e-6 * grad.abs().sum(0) + 1e-30).all()
    with pytest.raises(RuntimeError, match="grad_c must be a contiguous float32 tensor of c's shape"):
        kernels.backward_fp32_projected_sources(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m, row_sum,
                                                normaliser, scale, eps, grad_c[:, :-1], grad_x_m)


@pytest.mark.parametrize("T,DH,bs,with_bias", [(1, 2, 1, True), (17, 34, 2, False), (64, 96, 4, True),
                                               (33, 64, 8, True), (5, 16, 16, False)])
def test_bf16_projected_backward_can_take_the_projections_backward(kernels, T, DH, bs, with_bias):
    """backward_bf16_projected_sources (under bf16: the cell's backward that also takes the q, k, v projections'
    backward from each slice's fp32 dQ, dK, dV in cache) against backward_bf16_projected's q, k, v gradients (those
    sums rounded to bf16) put through the dense block-diagonal products in float64: c's gradient
    Wq^T dq + Wk^T dk, x_m's Wv^T dv, the weights' per-block outer sums and the biases' column sums, within the
    two bf16 roundings that separate them (dq's there, the result's here); the gate sums are the same bits. Both
    forms of the products where the CPU has them."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell's backward runs as separate products")
    B, H = 3, 3
    C = H * DH
    c, x_m, grad_h, weights, biases, a, row_max, m = _fp32_projected_inputs(B, H, T, DH, bs, with_bias,
                                                                             T + DH + bs + 4)
    c, x_m, grad_h = c.bfloat16(), x_m.bfloat16(), grad_h.bfloat16()
    projections = [weights[0], biases[0], weights[1], biases[1], weights[2], biases[2]]
    scale, eps = DH ** -0.5, 1e-6
    dense = [_block_dense(w) for w in weights]
    rows_c, rows_x = c.double().view(-1, C), x_m.double().view(-1, C)
    for tiles in ([True, False] if fused.has_tile_scores() else [False]):
        weights_c = torch.empty(B, H, T, T, dtype=torch.bfloat16)
        h = torch.empty(B, T, H, DH, dtype=torch.bfloat16).transpose(1, 2)
        row_sum, normaliser = kernels.forward_bf16_projected(c, x_m, H, *projections, a, row_max, m, scale, eps, h,
                                                             tiles, weights_c)
        head_grads = [torch.empty(B, H, T, DH, dtype=torch.bfloat16) for _ in range(3)]
        want_sums = kernels.backward_bf16_projected(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m,
                                                    row_sum, normaliser, scale, eps, *head_grads, tiles)
        grad_c, grad_x_m = (torch.full((B, T, C), float("nan"), dtype=torch.bfloat16) for _ in range(2))
        got = kernels.backward_bf16_projected_sources(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m,
                                                      row_sum, normaliser, scale, eps, grad_c, grad_x_m, tiles)
        assert len(got) == 9
        for x, y in zip(got[:3], want_sums):
            assert torch.equal(x, y)
        dq, dk, dv = (t.transpose(1, 2).reshape(-1, C).double() for t in head_grads)
        for got_x, want_x, bound in ((grad_c, dq @ dense[0] + dk @ dense[1], dq.abs() @ dense[0].abs()
                                      + dk.abs() @ dense[1].abs()),
                                     (grad_x_m, dv @ dense[2], dv.abs() @ dense[2].abs())):
            assert not got_x.isnan().any()
            # (each rounding to bf16 is within 2^-8 of its value: 2^-7 for the two, and a margin for the fp32 sums)
            assert ((got_x.view(-1, C).double() - want_x).abs() <= 2 ** -6 * bound + 1e-30).all(), tiles
        for p, (grad, source) in enumerate(((dq, rows_c), (dk, rows_c), (dv, rows_x))):
            grad_w, grad_b = got[3 + 2 * p], got[4 + 2 * p]
            assert grad_w.dtype == grad_b.dtype == torch.float32
            assert grad_w.shape == (C // bs, bs, bs) and grad_b.shape == (C,)
            blocks = (grad.view(-1, C // bs, bs), source.view(-1, C // bs, bs))
            want_w = torch.einsum("nbo,nbi->boi", *blocks)
            bound_w = torch.einsum("nbo,nbi->boi", *(t.abs() for t in blocks))
            assert ((grad_w.double() - want_w).abs() <= 2 ** -7 * bound_w + 1e-30).all(), tiles
            assert ((grad_b.double() - grad.sum(0)).abs() <= 2 ** -7 * grad.abs().sum(0) + 1e-30).all(), tiles
    with pytest.raises(RuntimeError, match="grad_x_m must be a contiguous bfloat16 tensor of c's shape"):
        kernels.backward_bf16_projected_sources(c, x_m, H, *projections, grad_h, h, weights_c, a, row_max, m,
                                                row_sum, normaliser, scale, eps, grad_c, grad_x_m.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_kernels_reject_bad_input(kernels, dtype):
    # forward_fp32_projected and forward_bf16_projected (and backward_fp32_projected) share their checks
    if dtype == torch.bfloat16 and not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    name = "float32" if dtype == torch.float32 else "bfloat16"
    forward = kernels.forward_fp32_projected if dtype == torch.float32 else kernels.forward_bf16_projected
    other = torch.bfloat16 if dtype == torch.float32 else torch.float32
    B, T, H, DH = 1, 4, 2, 8
    _, a, row_max = _decay_inputs(B, H, T)
    c = torch.randn(B, T, H * DH).to(dtype)
    w, b, h = torch.randn(H * DH // 4, 4, 4), torch.randn(H * DH), torch.empty(B, H, T, DH).to(dtype)

    def run(c=c, x_m=c, heads=H, wq=w, bq=b, h=h):
        forward(c, x_m, heads, wq, bq, w, b, w, b, a, row_max, row_max, 1.0, 1e-6, h)
    run()
    with pytest.raises(RuntimeError, match=f"c must be a contiguous .* {name} tensor"):
        run(c=c.to(other))
    with pytest.raises(RuntimeError, match=f"x_m must be contiguous {name} with c's shape"):
        run(x_m=c[:, :3].contiguous())
    with pytest.raises(RuntimeError, match="do not split into 3 heads"):
        run(heads=3)
    with pytest.raises(RuntimeError, match="the same block size"):
        run(wq=torch.randn(H * DH // 2, 2, 2))
    with pytest.raises(RuntimeError, match="each bias must have shape"):
        run(bq=torch.randn(3))
    with pytest.raises(RuntimeError, match=f"h must be a {name}"):
        run(h=h.to(other))
    with pytest.raises(RuntimeError, match="h must have shape"):
        run(h=torch.empty(B, H, T + 1, DH).to(dtype))
    if dtype == torch.float32:
        grads = [torch.empty(B, H, T, DH) for _ in range(3)]
        with pytest.raises(RuntimeError, match="weights has"):
            kernels.backward_fp32_projected(c, c, H, w, b, w, b, w, b, h, h, torch.zeros(B, H, T, 2), a, row_max,
                                            a, a, a, 1.0, 1e-6, *grads)


def test_projected_cell_gives_the_bits_of_the_projections_and_the_parallel_cell(kernels):
    """cell.mlstm_parallel_projected (inference) against block_diag_mm's q, k, v fed to mlstm_parallel under bf16
    autocast: equal; with gradients wanted it refuses (it has no backward)."""
    if not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    from vision_lstm.cell import mlstm_parallel_projected, projected_form_applies
    B, T, H, DH, bs = 2, 17, 4, 24, 4
    C = H * DH
    g = torch.Generator().manual_seed(0)
    c, x_m = (torch.randn(B, T, C, generator=g).bfloat16() for _ in range(2))
    projections = [((torch.randn(C // bs, bs, bs, generator=g) / 2).bfloat16(), torch.randn(C, generator=g).bfloat16())
                   for _ in range(3)]
    igate, fgate = (torch.randn(B, H, T, generator=g) for _ in range(2))
    q, k, v = (torch.empty(B, H, T, DH, dtype=torch.bfloat16) for _ in range(3))
    for source, (weight, bias), out in zip((c, c, x_m), projections, (q, k, v)):
        kernels.block_diag_mm([source.view(B, T, H, DH)], [weight], bias, out.transpose(1, 2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = mlstm_parallel(q, k, v, igate, fgate, token_major=True)
        got = mlstm_parallel_projected(c, x_m, H, projections, igate, fgate)
    assert got.shape == (B, H, T, DH) and got.transpose(1, 2).is_contiguous()
    assert torch.equal(got, want)
    assert not projected_form_applies(c, H)  # grad mode on, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="without gradients"):
        mlstm_parallel_projected(c, x_m, H, projections, igate, fgate)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="gates"):
        mlstm_parallel_projected(c, x_m, H, projections, igate[:, :2], fgate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,DH,norm_bias", [(2, 17, 4, 24, True), (3, 64, 4, 96, False), (2, 49, 4, 32, True)])
def test_gated_projected_cell_gives_the_bits_of_the_cell_then_the_gated_norm(kernels, dtype, B, T, H, DH, norm_bias):
    """mlstm_parallel_projected(output=...), the kernels that end with the layer's output path, against the h they
    would write fed to gated_head_norm_output (the gated norm's kernel): equal, in fp32 and under bf16 autocast;
    16-lane tails (DH 24), token tails (T 17, 49), with and without the norm's bias."""
    if dtype == torch.bfloat16 and not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16")
    from vision_lstm.cell import mlstm_parallel_projected
    from vision_lstm.layers import MultiHeadNorm, gated_head_norm_output
    C, bs = H * DH, 4
    g = torch.Generator().manual_seed(0)
    c, x_m, z = (torch.randn(B, T, C, generator=g).to(dtype) for _ in range(3))
    projections = [((torch.randn(C // bs, bs, bs, generator=g) / 2).to(dtype), torch.randn(C, generator=g).to(dtype))
                   for _ in range(3)]
    igate, fgate = (torch.randn(B, H, T, generator=g) for _ in range(2))
    norm = MultiHeadNorm(C, H, bias=norm_bias)
    with torch.no_grad():
        for param in norm.parameters():
            param.normal_(generator=g)
        skip = torch.randn(C, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            h = mlstm_parallel_projected(c, x_m, H, projections, igate, fgate)
            want = gated_head_norm_output(h.transpose(1, 2), c, z, norm, skip)
            got = mlstm_parallel_projected(c, x_m, H, projections, igate, fgate,
                                           output=(z, norm.weight, norm.bias, skip, norm.eps))
            assert got.shape == (B, T, C) and got.dtype == dtype and got.is_contiguous()
            assert torch.equal(got, want)
            assert want.abs().max() > 0.1  # (a test of something)
            with pytest.raises(ValueError, match="expected z with c's shape"):
                mlstm_parallel_projected(c, x_m, H, projections, igate, fgate,
                                         output=(z[:, 1:], norm.weight, norm.bias, skip, norm.eps))
    name = "forward_fp32_projected_gated" if dtype == torch.float32 else "forward_bf16_projected_gated"
    _, a, row_max = _decay_inputs(B, H, T)
    args = (c, x_m, H, *(t for pair in projections for t in pair), a, row_max, row_max, 1.0, 1e-6)
    y = torch.empty_like(c)
    with pytest.raises(RuntimeError, match="y must be contiguous with c's shape"):
        getattr(kernels, name)(*args, z, norm.weight, norm.bias, skip, 1e-5, y[:, 1:])
    with pytest.raises(RuntimeError, match="z must be contiguous with c's shape"):
        getattr(kernels, name)(*args, z.float() if dtype == torch.bfloat16 else z.bfloat16(), norm.weight,
                               norm.bias, skip, 1e-5, y)
    with pytest.raises(RuntimeError, match=r"skip must have shape \(%d\)" % C):
        getattr(kernels, name)(*args, z, norm.weight, norm.bias, skip[1:], 1e-5, y)


@pytest.mark.parametrize("T", [1, 15, 17, 49, 64, 100])  # whole 16-lane blocks, tails, more than 64
def test_weights_forward_matches_the_plain_formula(kernels, T):
    scores, a, row_max = _decay_inputs(2, 3, T)
    want = _weights_want(scores, a, row_max, 0.125)
    weights = torch.empty_like(scores)
    row_sum = kernels.weights_forward(scores, a, row_max, 0.125, weights)
    assert float((weights.double() - want).abs().max() / want.abs().max()) <= 1e-6
    assert torch.allclose(row_sum.double(), want.sum(-1), rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    # bf16 output: the same fp32 values, rounded once (at most one unit apart from rounding the float64 value)
    low = torch.empty_like(scores, dtype=torch.bfloat16)
    kernels.weights_forward(scores, a, row_max, 0.125, low)
    assert torch.equal(low, weights.bfloat16())
    # in place (fp32 C written over S) gives the same
    in_place = scores.clone()
    kernels.weights_forward(in_place, a, row_max, 0.125, in_place)
    assert torch.equal(in_place, weights)


def test_decay_exp_is_accurate_over_its_range(kernels):
    """The kernels' own vectorised exp on [-60, 0], and the clamp below it: within 4e-7 relative of float64.
    With scores of 1, a row maximum of 0 and scale 1, the last row of C is exp(max(a_s, -60))."""
    errors = []
    for chunk in torch.linspace(-80.0, 0.0, 64 * 1024).split(256):
        T = chunk.numel()
        weights = torch.empty(1, T, T)
        kernels.weights_forward(torch.ones(1, T, T), chunk.view(1, T).contiguous(), torch.zeros(1, T), 1.0, weights)
        want = chunk.double().clamp_min(_LOG_DECAY_FLOOR).exp()
        errors.append(float(((weights[0, -1].double() - want).abs() / want).max()))
    assert max(errors) <= 4e-7


@pytest.mark.parametrize("mm_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weights_backward_matches_the_plain_formula(kernels, mm_dtype):
    acc = torch.float64 if mm_dtype == torch.float64 else torch.float32
    scores, a, row_max = _decay_inputs(2, 3, 37, seed=1, dtype=acc)
    g = torch.Generator().manual_seed(2)
    weights = _weights_want(scores, a, row_max, 0.25).to(mm_dtype)
    grad_c = torch.randn(2, 3, 37, 37, generator=g, dtype=torch.float64).to(mm_dtype)
    grad_row_sum = torch.randn(2, 3, 37, generator=g, dtype=torch.float64).to(acc)
    grad_scores, rows, cols = kernels.weights_backward(grad_c, grad_row_sum, weights, a, row_max, 0.25)
    d_c = grad_c.double() + grad_row_sum.double()[..., None]
    decay = _weights_want(torch.ones_like(scores), a, row_max, 0.25)
    d_log = d_c * weights.double()
    tol = 1e-12 if mm_dtype == torch.float64 else 1e-5
    assert grad_scores.dtype == mm_dtype
    want_scores = d_c * decay
    if mm_dtype == torch.bfloat16:  # the fp32 product rounded once
        assert (grad_scores.double() - want_scores).abs().max() <= 2 ** -8 * want_scores.abs().max()
    else:
        assert (grad_scores.double() - want_scores).abs().max() <= tol * want_scores.abs().max()
    assert (rows.double() - d_log.sum(-1)).abs().max() <= tol * d_log.abs().sum(-1).max()
    assert (cols.double() - d_log.sum(-2)).abs().max() <= tol * d_log.abs().sum(-2).max()


def test_row_division_is_the_fp32_quotient_rounded_once(kernels):
    """bf16 rows / fp32 denominators: exactly what PyTorch's (slow) mixed-dtype division gives, into a strided
    output, and the row dot product of the rounded quotient with h in fp32."""
    g = torch.Generator().manual_seed(0)
    num = torch.randn(4, 3, 50, 40, generator=g).bfloat16()
    num[0, 0, 0, 0] = float("nan")
    denom = torch.rand(4, 3, 50, generator=g) * 30 + 1e-3
    want = (num.float() / denom[..., None]).bfloat16()
    out = torch.empty(4, 50, 3, 40, dtype=torch.bfloat16).transpose(1, 2)  # a head view of token-major memory
    kernels.divide_rows(num, denom, out)
    assert torch.equal(out.nan_to_num(), want.nan_to_num())
    assert out.isnan().sum() == 1
    h = torch.randn(4, 50, 3, 40, generator=g).bfloat16().transpose(1, 2)
    out2 = torch.empty_like(num)
    dot = kernels.divide_rows_dot(num, denom, out2, h)
    assert torch.equal(out2.nan_to_num(), want.nan_to_num())
    want_dot = (want.float() * h.float()).sum(-1)
    finite = want_dot.isfinite()
    assert torch.allclose(dot[finite], want_dot[finite], rtol=1e-5, atol=1e-5)


def test_kernels_reject_bad_inputs_with_a_clear_message(kernels):
    scores, a, row_max = _decay_inputs(1, 2, 8)
    with pytest.raises(RuntimeError, match="scores must be contiguous"):
        kernels.weights_forward(scores.transpose(-2, -1), a, row_max, 1.0, torch.empty_like(scores))
    with pytest.raises(RuntimeError, match="scores must be float32 or float64"):
        kernels.weights_forward(scores.half(), a.half(), row_max.half(), 1.0, torch.empty_like(scores))
    with pytest.raises(RuntimeError, match="denom must be"):
        kernels.divide_rows(torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 8, dtype=torch.float64),
                            torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16))


def _block_dense(weight):  # (nb, bs, bs) -> the (C, C) block-diagonal matrix, float64
    return torch.block_diag(*weight.double())


def _bf16_close(got, want):  # rounded once to bf16: within half a bf16 unit of the largest value, plus fp32 sums
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2 ** -8 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,DH,bs", [(2, 5, 4, 96, 4), (3, 7, 2, 40, 8), (2, 3, 3, 24, 4), (1, 4, 1, 16, 16),
                                         (2, 3, 2, 8, 1), (2, 9, 4, 6, 2), (128, 64, 4, 96, 4)])
def test_block_diagonal_kernels_match_the_dense_product(kernels, dtype, B, T, H, DH, bs):
    # csrc/blockdiag_cpu.cpp against the dense block-diagonal matrix in float64: the product into head-major and
    # token-major memory, the transposed product of two inputs summed (an input gradient), and the weight and bias
    # gradients. Heads whose width is not a multiple of 16 (40, 24, 8, 6) exercise the shorter last vector.
    gen = torch.Generator().manual_seed(0)
    C = H * DH
    x = torch.randn(B, T, C, generator=gen).to(dtype)
    w1, w2 = (torch.randn(C // bs, bs, bs, generator=gen) for _ in range(2))
    bias = torch.randn(C, generator=gen)
    if bs > fused.vector_lanes():  # 16-channel blocks on a build with 8-lane vectors (no AVX-512): refused
        with pytest.raises(RuntimeError, match="block size 16 is wider than this build's vectors"):
            kernels.block_diag_mm([x.view(B, T, H, DH)], [w1], bias, torch.empty(B, T, H, DH, dtype=dtype))
        with pytest.raises(RuntimeError, match="wider than this build's vectors"):
            kernels.block_diag_outer(x.view(B, T, H, DH), x.view(B, T, H, DH), bs)
        return
    w1_used, w2_used = (w.to(dtype) for w in (w1, w2))  # products in the inputs' dtype, as autocast runs them
    head_major = torch.empty(B, H, T, DH, dtype=dtype)
    kernels.block_diag_mm([x.view(B, T, H, DH)], [w1_used], bias.to(dtype), head_major.transpose(1, 2))
    token_major = torch.empty(B, T, C, dtype=dtype)
    kernels.block_diag_mm([x.view(B, T, H, DH)], [w1], bias, token_major.view(B, T, H, DH))  # fp32 weights as well
    for got, weight, b in ((head_major.transpose(1, 2).reshape(-1, C), w1_used, bias.to(dtype)),
                           (token_major.view(-1, C), w1, bias)):
        want = x.double().view(-1, C) @ _block_dense(weight).T + b.double()
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        else:
            _bf16_close(got, want)
    g1, g2 = (torch.randn(B, H, T, DH, generator=gen).to(dtype) for _ in range(2))
    grad_x = torch.empty(B, T, C, dtype=dtype)
    kernels.block_diag_mm([g1.transpose(1, 2), g2.transpose(1, 2)], [w1_used.transpose(1, 2), w2_used.transpose(1, 2)],
                          None, grad_x.view(B, T, H, DH))
    g1_rows, g2_rows = (g.transpose(1, 2).reshape(-1, C).double() for g in (g1, g2))
    want_x = g1_rows @ _block_dense(w1_used) + g2_rows @ _block_dense(w2_used)
    if dtype == torch.float32:
        torch.testing.assert_close(grad_x.view(-1, C).double(), want_x, rtol=1e-5, atol=1e-5)
    else:
        _bf16_close(grad_x.view(-1, C), want_x)
    # with an addend (a gradient from elsewhere, summed in by the same pass): into other memory, and in place
    addend = torch.randn(B, T, C, generator=gen).to(dtype)
    summed, in_place = torch.empty(B, T, C, dtype=dtype), addend.clone()
    kernels.block_diag_mm([g1.transpose(1, 2)], [w1_used.transpose(1, 2)], None, summed.view(B, T, H, DH),
                          addend.view(B, T, H, DH))
    kernels.block_diag_mm([g1.transpose(1, 2)], [w1_used.transpose(1, 2)], None, in_place.view(B, T, H, DH),
                          in_place.view(B, T, H, DH))
    want_sum = g1_rows @ _block_dense(w1_used) + addend.double().view(-1, C)
    for got in (summed, in_place):
        if dtype == torch.float32:
            torch.testing.assert_close(got.view(-1, C).double(), want_sum, rtol=1e-5, atol=1e-5)
        else:
            _bf16_close(got.view(-1, C), want_sum)
    grad_w, grad_b, no_gate = kernels.block_diag_outer(g1.transpose(1, 2), x.view(B, T, H, DH), bs)
    assert grad_w.shape == (C // bs, bs, bs) and grad_w.dtype == grad_b.dtype == torch.float32
    assert no_gate.shape == (0, C)
    blocks = (g1_rows.view(-1, C // bs, bs), x.double().view(-1, C // bs, bs))
    want_w = torch.einsum("nbo,nbi->boi", *blocks)
    # fp32 sums of exact products (bf16 x bf16 fits fp32): error within a few fp32 units of the sum of magnitudes
    bound_w = torch.einsum("nbo,nbi->boi", *(t.abs() for t in blocks))
    assert ((grad_w.double() - want_w).abs() <= 1e-6 * bound_w + 1e-30).all()
    assert ((grad_b.double() - g1_rows.sum(0)).abs() <= 1e-6 * g1_rows.abs().sum(0)).all()
    # the gates' weight gradient g^T x (g: the gates' gradient (N, G)) from the same pass, the other two gradients
    # unchanged by it; G = 2 H + 1 is not a multiple of 8 (the kernel pads it)
    G = 2 * H + 1
    gate_grad = torch.randn(B * T, G, generator=gen).to(dtype)
    grad_w2, grad_b2, grad_gate = kernels.block_diag_outer(g1.transpose(1, 2), x.view(B, T, H, DH), bs, gate_grad)
    assert torch.equal(grad_w2, grad_w) and torch.equal(grad_b2, grad_b)
    assert grad_gate.shape == (G, C) and grad_gate.dtype == torch.float32
    rows_g, rows_x = gate_grad.double(), x.double().view(-1, C)
    assert ((grad_gate.double() - rows_g.T @ rows_x).abs() <= 1e-6 * (rows_g.abs().T @ rows_x.abs()) + 1e-30).all()


def test_block_diagonal_kernels_reject_bad_input(kernels):
    x = torch.zeros(2, 3, 4, 8)
    w = torch.zeros(8, 4, 4)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="block size must be 1, 2, 4, 8 or 16"):
        kernels.block_diag_mm([torch.zeros(2, 3, 4, 6)], [torch.zeros(8, 3, 3)], None, torch.zeros(2, 3, 4, 6))
    with pytest.raises(RuntimeError, match="head dimension 6 must be a multiple of the block size 4"):
        kernels.block_diag_mm([torch.zeros(2, 3, 4, 6)], [torch.zeros(6, 4, 4)], None, torch.zeros(2, 3, 4, 6))
    with pytest.raises(RuntimeError, match="must have the dtype"):
        kernels.block_diag_mm([x.bfloat16()], [w], None, out)
    with pytest.raises(RuntimeError, match="unit last stride"):
        kernels.block_diag_mm([x], [w], None, torch.empty(2, 3, 8, 4).transpose(2, 3))
    with pytest.raises(RuntimeError, match="one weight per input"):
        kernels.block_diag_mm([x, x], [w], None, out)
    with pytest.raises(RuntimeError, match="one or two inputs"):
        kernels.block_diag_mm([x, x, x], [w, w, w], None, out)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        kernels.block_diag_mm([x], [w], torch.zeros(7), out)
    with pytest.raises(RuntimeError, match="addend must have the dtype"):
        kernels.block_diag_mm([x], [w], None, out, x.bfloat16())
    with pytest.raises(RuntimeError, match="addend must be a"):
        kernels.block_diag_mm([x], [w], None, out, torch.zeros(2, 3, 32))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.block_diag_outer(x.double(), x.double(), 4)
    with pytest.raises(RuntimeError, match="gate_grad must be a .N, G. CPU tensor with N = B . T = 6 rows"):
        kernels.block_diag_outer(x, x, 4, torch.zeros(7, 8))


def _gated_norm_want(h, c, z, weight, bias, skip, eps=1e-5):  # float64, written plainly: (B, T, H, DH) h
    B, T, H, DH = h.shape
    mean = h.mean(-1, keepdim=True)
    normed = ((h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + eps)).reshape(B, T, H * DH)
    pre = normed * (1 + weight) + (bias if bias is not None else 0) + skip * c
    return pre * z * torch.sigmoid(z)


def _assert_close_to(got, want, dtype):  # fp32: fp32 rounding of fp32 sums; bf16: one rounding to bf16
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
    else:
        _bf16_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,DH,with_bias,with_z_bias", [(2, 5, 4, 96, True, True), (3, 7, 2, 40, False, True),
                                                            (2, 3, 3, 6, True, False), (1, 4, 1, 16, True, True),
                                                            (128, 64, 4, 96, True, False), (2, 5, 4, 96, True, False)])
def test_gated_norm_kernels_match_the_plain_formula(kernels, dtype, B, T, H, DH, with_bias, with_z_bias):
    # csrc/layer_cpu.cpp's output path (y = (HeadNorm(h) (1 + w) + b + skip c) SiLU(z + z_bias)) against float64
    # autograd of the formula, on the same (rounded) inputs: the output, the mean and 1 / std it keeps, and every
    # gradient. z is a column slice of a wider tensor, as the layer passes it; heads of 40 and 6 channels end in a
    # shorter vector. z_bias (the layer leaves z's bias to this kernel in fp32 training) or None.
    gen = torch.Generator().manual_seed(0)
    C = H * DH
    h = torch.randn(B, T, H, DH, generator=gen).mul(3).add(1).to(dtype)
    c = torch.randn(B, T, C, generator=gen).to(dtype)
    z_wide = torch.randn(B, T, C + 8, generator=gen).mul(4).to(dtype)  # SiLU over [-12, 12] and beyond
    z = z_wide[..., :C]
    weight, skip = torch.randn(C, generator=gen) * 0.3, torch.randn(C, generator=gen)
    bias = torch.randn(C, generator=gen) * 0.3 if with_bias else None
    z_bias = torch.randn(C, generator=gen) if with_z_bias else None
    out = torch.empty(B, T, C, dtype=dtype)
    mean, rstd = kernels.gated_norm_forward(h, c, z, weight, bias, skip, 1e-5, out, z_bias)
    inputs = [t.double().requires_grad_() for t in (h, c, z, weight, skip)]
    bias64 = bias.double().requires_grad_() if with_bias else None
    z_bias64 = z_bias.double().requires_grad_() if with_z_bias else None
    z_used = inputs[2] + z_bias64 if with_z_bias else inputs[2]
    want = _gated_norm_want(*inputs[:2], z_used, inputs[3], bias64, inputs[4])
    _assert_close_to(out, want.detach(), dtype)
    h64 = h.double()
    torch.testing.assert_close(mean.double(), h64.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(h64.var(-1, unbiased=False) + 1e-5), rtol=1e-5, atol=0)
    grad_y = torch.randn(B, T, C, generator=gen).to(dtype)
    want.backward(grad_y.double())
    grads = kernels.gated_norm_backward(grad_y, h, c, z, weight, bias, skip, mean, rstd, z_bias)
    grad_h, grad_c, grad_z, grad_w, grad_b, grad_skip, grad_z_sums = grads
    assert grad_h.shape == h.shape and grad_c.shape == grad_z.shape == (B, T, C)
    assert grad_h.dtype == grad_c.dtype == grad_z.dtype == dtype
    assert grad_w.dtype == grad_b.dtype == grad_skip.dtype == grad_z_sums.dtype == torch.float32
    for got, source in ((grad_h, inputs[0]), (grad_c, inputs[1]), (grad_z, inputs[2])):
        _assert_close_to(got, source.grad, dtype)
    # parameter gradients: fp32 sums over B * T rows, within a few fp32 units of the sum of the magnitudes; the
    # last sum is z's column sums (z_bias's gradient), whether or not a z_bias was given
    want_z_sums = z_bias64.grad if with_z_bias else inputs[2].grad.sum((0, 1))
    for got, source in ((grad_w, inputs[3].grad), (grad_skip, inputs[4].grad), (grad_z_sums, want_z_sums)) + \
            (((grad_b, bias64.grad),) if with_bias else ()):
        torch.testing.assert_close(got.double(), source, rtol=1e-4, atol=1e-4 * source.abs().max().item())


def _conv_silu_want(x, grid, weight, bias):  # float64: PyTorch's depthwise conv on the grid, then SiLU
    B, T, C = x.shape
    image = x.reshape(B, *grid, C).permute(0, 3, 1, 2)
    u = torch.nn.functional.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=C)
    return torch.nn.functional.silu(u).permute(0, 2, 3, 1).reshape(B, T, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,grid,C,k,with_bias", [(2, (8, 8), 384, 3, True), (3, (4, 6), 40, 3, False),
                                                  (1, (5, 3), 24, 5, True), (2, (3, 4), 16, 1, True),
                                                  (2, (7, 7), 20, 7, True), (1, (1, 9), 8, 3, True)])
def test_conv_silu_kernels_match_pytorchs_convolution(kernels, dtype, B, grid, C, k, with_bias):
    # csrc/layer_cpu.cpp's SiLU(depthwise conv + bias) against PyTorch's convolution in float64 on the same (rounded)
    # inputs: output, input gradient and the weight and bias gradients, for kernel sizes 1-7, non-square grids, one
    # row of pixels, and channel counts that end in a shorter vector (40, 24, 20, 8).
    gen = torch.Generator().manual_seed(0)
    T = grid[0] * grid[1]
    x = torch.randn(B, T, C, generator=gen).to(dtype)
    weight = torch.randn(C, 1, k, k, generator=gen) * 0.5
    bias = torch.randn(C, generator=gen) * 0.5 if with_bias else None
    out = torch.empty_like(x)
    assert kernels.conv_silu_forward(x, *grid, weight, bias, out).numel() == 0
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if with_bias else None
    want = _conv_silu_want(x64, grid, w64, b64)
    _assert_close_to(out, want.detach(), dtype)
    # with the gates' weights (G, C): the same c, and c's product with them summed by the kernel (c as stored)
    for G in (8, 3):
        gate_w = torch.randn(G, C, generator=gen).to(dtype)
        with_gates = torch.empty_like(x)
        gates = kernels.conv_silu_forward(x, *grid, weight, bias, with_gates, gate_w)
        assert torch.equal(with_gates, out) and gates.shape == (B, T, G) and gates.dtype == dtype
        _assert_close_to(gates, out.double() @ gate_w.double().t(), dtype)
    grad_out = torch.randn(B, T, C, generator=gen).to(dtype)
    want.backward(grad_out.double())
    grad_x, grad_w, grad_b = kernels.conv_silu_backward(grad_out, x, *grid, weight, bias)
    assert grad_x.dtype == dtype and grad_w.dtype == grad_b.dtype == torch.float32
    assert grad_w.shape == weight.shape and grad_b.shape == (C,)
    _assert_close_to(grad_x, x64.grad, dtype)
    for got, source in ((grad_w, w64),) + (((grad_b, b64),) if with_bias else ()):
        torch.testing.assert_close(got.double(), source.grad, rtol=1e-4, atol=1e-4 * source.grad.abs().max().item())
    # conv_silu_backward_summed: c's gradient is grad_out + more + gate_grad @ gate_w, x's gets the addend, and the
    # gates' weight gradient gate_grad^T c (c as stored) comes too; G = 10 takes the path past 8 gates
    for G, with_more, with_addend in ((8, True, True), (10, False, True), (0, True, False)):
        more, addend = (torch.randn(B, T, C, generator=gen).to(dtype) if use else None
                        for use in (with_more, with_addend))
        gate_grad = torch.randn(B, T, G, generator=gen) if G else None
        gate_w = torch.randn(G, C, generator=gen).to(dtype) if G else None
        grad_c = grad_out.double() + (more.double() if with_more else 0)
        if G:
            grad_c = grad_c + gate_grad.double() @ gate_w.double()
        x64.grad = w64.grad = None
        if with_bias:
            b64.grad = None
        _conv_silu_want(x64, grid, w64, b64).backward(grad_c)
        got_x, got_w, got_b, got_gate = kernels.conv_silu_backward_summed(grad_out, x, *grid, weight, bias, more,
                                                                          gate_grad, gate_w, addend)
        _assert_close_to(got_x, x64.grad + (addend.double() if with_addend else 0), dtype)
        for got, source in ((got_w, w64),) + (((got_b, b64),) if with_bias else ()):
            torch.testing.assert_close(got.double(), source.grad, rtol=1e-4,
                                       atol=1e-4 * source.grad.abs().max().item())
        if G:
            want_gate = gate_grad.double().reshape(-1, G).t() @ out.double().reshape(-1, C)
            assert got_gate.shape == (G, C) and got_gate.dtype == torch.float32
            torch.testing.assert_close(got_gate.double(), want_gate, rtol=1e-5,
                                       atol=1e-5 * want_gate.abs().max().item())
        else:
            assert got_gate.numel() == 0
    with pytest.raises(RuntimeError, match="gate_grad and gate_w come together"):
        kernels.conv_silu_backward_summed(grad_out, x, *grid, weight, bias, None, None, torch.ones(8, C), None)
    with pytest.raises(RuntimeError, match="addend must be contiguous"):
        kernels.conv_silu_backward_summed(grad_out, x, *grid, weight, bias, None, None, None,
                                          torch.zeros(B, C, T, dtype=dtype).transpose(1, 2))


def test_silu_kernel_is_accurate_for_any_input(kernels):
    # The kernels' SiLU (vec.h's sigmoid: exp's argument clamped to [-87, 88], 2^n applied by vscalefps with
    # AVX-512) through conv_silu with a 1 x 1 kernel of weight 1: against float64 for inputs far outside exp's range
    # (where an unclamped exp gives inf or NaN), near its ends, and ordinary ones; NaN stays NaN.
    values = [-1e30, -1e4, -100.0, -88.7, -87.5, -87.0, -20.0, -1.0, -1e-30, 0.0, 1e-30, 0.5, 1.0, 20.0, 87.0,
              87.5, 88.7, 100.0, 1e4, 1e30, float("nan")]
    x = torch.tensor(values).view(1, -1, 1).expand(1, len(values), 19).contiguous()  # 19 channels: a short vector
    weight, bias = torch.ones(19, 1, 1, 1), torch.zeros(19)
    out = torch.empty_like(x)
    kernels.conv_silu_forward(x, 1, len(values), weight, bias, out)
    grad_x, _, _ = kernels.conv_silu_backward(torch.ones_like(x), x, 1, len(values), weight, bias)
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.silu(x64)
    want.sum().backward()
    nan = x.isnan()
    assert torch.equal(out.isnan(), nan) and torch.equal(grad_x.isnan(), nan)
    for got, ref in ((out, want.detach()), (grad_x, x64.grad)):
        error = (got.double() - ref)[~nan].abs()
        assert (error <= 1e-6 * ref[~nan].abs() + 1e-8).all(), error.max()


@pytest.mark.parametrize("x_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("B,T,D", [(2, 5, 192), (3, 7, 40), (1, 4, 6)])
def test_token_norm_and_reversed_sum_kernels_match_pytorch(kernels, x_dtype, out_dtype, reverse, B, T, D):
    # The block's input norm (written in the layer's dtype and, for the reversed block, token order) and the reversed
    # residual sum against PyTorch in float64 on the same (rounded) inputs: output, statistics, every gradient.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=gen).mul(2).add(1).to(x_dtype)
    weight, bias = torch.randn(D, generator=gen) * 0.3, torch.randn(D, generator=gen) * 0.3
    out = torch.empty(B, T, D, dtype=out_dtype)
    mean, rstd = kernels.token_norm_forward(x, weight, bias, 1e-5, reverse, out)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    want = torch.nn.functional.layer_norm(x64, (D,), 1 + w64, b64, 1e-5)
    want = want.flip(1) if reverse else want
    _assert_close_to(out, want.detach(), out_dtype)
    torch.testing.assert_close(mean.double(), x.double().mean(-1), rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(B, T, D, generator=gen).to(out_dtype)
    want.backward(grad_out.double())
    grad_x, grad_w, grad_b = kernels.token_norm_backward(grad_out, x, weight, mean, rstd, reverse)
    assert grad_x.dtype == x_dtype and grad_w.dtype == grad_b.dtype == torch.float32
    _assert_close_to(grad_x, x64.grad, x_dtype)
    for got, source in ((grad_w, w64), (grad_b, b64)):
        torch.testing.assert_close(got.double(), source.grad, rtol=1e-4, atol=1e-4 * source.grad.abs().max().item())
    residual = torch.randn(B, T, D, generator=gen).to(x_dtype)  # the residual path's gradient, summed in
    summed = kernels.token_norm_backward(grad_out, x, weight, mean, rstd, reverse, residual)[0]
    _assert_close_to(summed, x64.grad + residual.double(), x_dtype)
    y = torch.randn(B, T, D, generator=gen).to(out_dtype)
    total = torch.empty(B, T, D, dtype=x_dtype)
    kernels.add_reversed(x, y, total)
    _assert_close_to(total, x.double() + y.double().flip(1), x_dtype)
    flipped = torch.empty(B, T, D, dtype=out_dtype)
    kernels.add_reversed(None, x, flipped)  # the sum's gradient for y: flipped, cast to y's dtype
    assert torch.equal(flipped, x.flip(1).to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,C", [(8192, 384), (37, 200), (5, 7), (1, 16), (130, 136)])
def test_column_sums_kernel_is_the_fp32_sum_over_rows(kernels, dtype, N, C):
    # csrc/layer_cpu.cpp's column_sums (a bias's gradient) against float64: fp32 sums of the rows, within a few fp32
    # units of the sum of magnitudes; channel counts that end in a shorter vector (200, 7, 136), more rows than a
    # row block and threads' ranges that end inside one.
    x = torch.randn(N, C, generator=torch.Generator().manual_seed(0)).mul(3).to(dtype)
    got = kernels.column_sums(x)
    assert got.dtype == torch.float32 and got.shape == (C,)
    want = x.double().sum(0)
    assert ((got.double() - want).abs() <= 1e-6 * x.double().abs().sum(0) + 1e-30).all()


def test_layer_kernels_reject_bad_input(kernels):
    with pytest.raises(RuntimeError, match=r"x must be a contiguous \(N, C\) tensor"):
        kernels.column_sums(torch.zeros(4, 6).t())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.column_sums(torch.zeros(4, 6, dtype=torch.float64))
    h, cz = torch.zeros(2, 3, 4, 8), torch.zeros(2, 3, 32)
    w = torch.zeros(32)
    with pytest.raises(RuntimeError, match="c must have the shape"):
        kernels.gated_norm_forward(h, torch.zeros(2, 3, 30), cz, w, w, w, 1e-5, torch.empty_like(cz))
    with pytest.raises(RuntimeError, match="z must have the dtype"):
        kernels.gated_norm_forward(h, cz, cz.bfloat16(), w, w, w, 1e-5, torch.empty_like(cz))
    with pytest.raises(RuntimeError, match="h must be contiguous"):
        kernels.gated_norm_forward(torch.zeros(2, 4, 3, 8).transpose(1, 2), cz, cz, w, w, w, 1e-5, torch.empty_like(cz))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        kernels.gated_norm_forward(h, cz, cz, torch.zeros(31), w, w, 1e-5, torch.empty_like(cz))
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        kernels.gated_norm_backward(cz, h, cz, cz, w, w, w, torch.zeros(2, 3, 4), torch.zeros(5))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.gated_norm_forward(h.double(), cz, cz, w, w, w, 1e-5, torch.empty_like(cz))
    with pytest.raises(RuntimeError, match="z_bias must have shape"):
        kernels.gated_norm_forward(h, cz, cz, w, w, w, 1e-5, torch.empty_like(cz), torch.zeros(31))
    x = torch.zeros(2, 12, 16)
    with pytest.raises(RuntimeError, match="got 12 tokens for a 3x5 grid"):
        kernels.conv_silu_forward(x, 3, 5, torch.zeros(16, 1, 3, 3), None, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="k = 1, 3, 5 or 7"):
        kernels.conv_silu_forward(x, 3, 4, torch.zeros(16, 1, 2, 2), None, torch.empty_like(x))
    with pytest.raises(RuntimeError, match=r"gate_w must have shape \(G, 16\)"):
        kernels.conv_silu_forward(x, 3, 4, torch.zeros(16, 1, 3, 3), None, torch.empty_like(x), torch.zeros(8, 15))
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernels.conv_silu_forward(torch.zeros(2, 16, 12).transpose(1, 2), 3, 4, torch.zeros(16, 1, 3, 3), None,
                                  torch.empty_like(x))
    with pytest.raises(RuntimeError, match="grad_out must have the dtype"):
        kernels.conv_silu_backward(x.bfloat16(), x, 3, 4, torch.zeros(16, 1, 3, 3), None)
    with pytest.raises(RuntimeError, match="out must have the shape"):
        kernels.token_norm_forward(x, torch.zeros(16), None, 1e-5, False, torch.empty(2, 12, 8))
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        kernels.token_norm_forward(x.transpose(0, 1), torch.zeros(16), None, 1e-5, False, torch.empty(12, 2, 16))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        kernels.token_norm_forward(x, torch.zeros(15), None, 1e-5, False, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="mean and rstd must be"):
        kernels.token_norm_backward(x, x, torch.zeros(16), torch.zeros(2, 11), torch.zeros(2, 12), False)
    with pytest.raises(RuntimeError, match="addend must have x's shape"):
        kernels.token_norm_backward(x, x, torch.zeros(16), torch.zeros(2, 12), torch.zeros(2, 12), False, x.bfloat16())
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        kernels.add_reversed(x, x, torch.empty_like(x).bfloat16())
    with pytest.raises(RuntimeError, match="x must have the shape"):
        kernels.add_reversed(torch.zeros(2, 11, 16), x, torch.empty_like(x))


def test_cell_falls_back_to_its_pytorch_form_when_the_build_fails(monkeypatch):
    monkeypatch.setenv("VIL_FUSED", "1")
    monkeypatch.setattr(fused, "_build", lambda: RuntimeError("no C++ compiler (simulated by the test)"))
    q, k, v = (torch.randn(2, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    i, f = (torch.randn(2, 2, 9, dtype=torch.float64) for _ in range(2))
    with pytest.warns(RuntimeWarning, match="could not be built .*simulated.*PyTorch form"):
        out = mlstm_parallel(q, k, v, i, f)
    assert torch.allclose(out, mlstm_parallel_reference(q, k, v, i, f), atol=1e-12)


def test_vil_fused_0_turns_the_kernels_off_without_building(monkeypatch):
    def must_not_build():
        raise AssertionError("VIL_FUSED=0 must not build the kernels")

    monkeypatch.setattr(fused, "_build", must_not_build)
    for value in ("0", "off", "False"):
        monkeypatch.setenv("VIL_FUSED", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fused.ops() is None
            mlstm_parallel(*(torch.randn(1, 1, 5, 4) for _ in range(3)), torch.randn(1, 1, 5), torch.randn(1, 1, 5))


_MALLOC_VARIABLES = ("VIL_MALLOC", *runtime._USER_SETTINGS)  # each opts out of the malloc settings


def _run_with_kernels(code: str, full: bool = False, **env):
    """Runs code in a fresh interpreter after loading the kernels (as a model's first use does); returns stdout
    (with full, the finished process: stdout and stderr)."""
    import os
    import subprocess
    import sys
    clean = {k: v for k, v in os.environ.items() if k not in _MALLOC_VARIABLES}
    prelude = "import os, torch\nfrom vision_lstm import fused\nassert fused.ops() is not None\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], env={**clean, "VIL_FUSED": "1", **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done if full else done.stdout


def test_tensor_cache_reuses_freed_blocks_by_size(kernels):
    # csrc/alloc_cpu.cpp: a freed block of 64 KB or more serves the next request of its size (up to 1/8 smaller);
    # other sizes get blocks of their own; small tensors bypass the cache. Fails without the cache (no hits, new
    # addresses) and if a block were reused for a request larger than it.
    out = _run_with_kernels(
        "s0 = fused.tensor_cache_stats(); assert s0['installed'], s0\n"
        "a = torch.full((1 << 18,), 3.0); pa = a.data_ptr(); del a\n"  # 1 MB
        "b = torch.empty((1 << 18) - 4000); assert b.data_ptr() == pa\n"  # 1/16 smaller: the same block
        "b.fill_(1.0); del b\n"
        "c = torch.ones((1 << 18) + 2048); assert c.data_ptr() != pa and float(c.sum()) == (1 << 18) + 2048\n"
        "d = torch.empty((1 << 17)); assert d.data_ptr() != pa\n"  # half the size: not that block
        "small = torch.ones(100); del small\n"
        "s = fused.tensor_cache_stats()\n"
        "print(s['hits'] - s0['hits'], s['misses'] - s0['misses'], s['cached'] // 4096)\n")
    assert out.split() == ["1", "3", "256"]  # b reused a's block; c, d and the first a came from malloc


def test_tensor_cache_holds_at_most_the_peak_in_use_and_releases_it(kernels):
    # The cache never holds more than the peak of the bytes in use, so shapes that change do not pile up blocks;
    # release_tensor_cache hands everything back.
    out = _run_with_kernels(
        "import gc\n"
        "for size in (1, 2, 3, 4, 5, 6, 7, 8):  # MB, one after another: each freed block is a size of its own\n"
        "    t = torch.empty(size << 18); del t\n"
        "s = fused.tensor_cache_stats(); assert s['in_use'] == 0, s\n"
        "assert 0 < s['cached'] <= s['peak_in_use'] == 8 << 20, s\n"
        "print(fused.release_tensor_cache() == s['cached'], fused.tensor_cache_stats()['cached'])\n"
        "big = torch.empty(40 << 18); del big  # 40 MB: above glibc's mapping threshold, back to malloc (and the OS)\n"
        "print(fused.tensor_cache_stats()['cached'])\n")
    assert out.split() == ["True", "0", "0"]


def test_tensor_cache_reports_out_of_memory(kernels):
    # A request malloc cannot serve (here 4 PB) is PyTorch's out-of-memory error with the size, not a crash; the
    # counters stay as they were.
    out = _run_with_kernels(
        "s0 = fused.tensor_cache_stats()\n"
        "try:\n"
        "    torch.empty(1 << 50)\n"
        "except torch.OutOfMemoryError as error:\n"
        "    print('refused', '4503599627370496 bytes' in str(error))\n"
        "s = fused.tensor_cache_stats()\n"
        "print(s['in_use'] == s0['in_use'], s['peak_in_use'] == s0['peak_in_use'])\n")
    assert out.split() == ["refused", "True", "True", "True"]


@pytest.mark.parametrize("env", [{"VIL_MALLOC": "default"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_tensor_cache_is_left_out_when_the_user_opts_out(kernels, env):
    out = _run_with_kernels("print(fused.tensor_cache_stats()['installed'])\n", **env)
    assert out.strip() == "False"


def test_tensor_cache_survives_threads_and_fork(kernels):
    # Python threads allocate and free concurrently (torch releases the GIL in its ops) and a forked child allocates
    # with the lock the parent may hold: every block must come back (in_use returns to 0) and the child must not hang.
    # The ops run once on small tensors before the threads start: PyTorch picks an op's CPU kernel at its first call
    # inside a function-local static, and a child forked while a thread is in that first call waits on the static's
    # guard forever (session 32: gdb found the child in __cxa_guard_acquire under
    # DispatchStubImpl::try_choose_cpu_impl, in randint, after 182 runs; PyTorch's own fork hazard, not the
    # cache's). Small, so that this thread runs no OpenMP region: with GNU OpenMP a child forked after its parent's
    # thread ran one hangs in that thread's next one (tried: it hung every time). A child still running after 120 s
    # writes its Python stack to stderr and exits 1 (faulthandler), so that any other hang shows where.
    done = _run_with_kernels(
        "import faulthandler, threading\n"
        "def churn(seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    for _ in range(300):\n"
        "        n = int(torch.randint(1 << 14, 1 << 19, (1,), generator=g))\n"
        "        x = torch.ones(n); y = x * 2; assert float(y[-1]) == 2.0\n"
        "float((torch.ones(64) * 2)[-1]); torch.randint(0, 2, (1,), generator=torch.Generator().manual_seed(0))\n"
        "threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]\n"
        "[t.start() for t in threads]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    faulthandler.dump_traceback_later(120, exit=True)\n"
        "    churn(9); os._exit(0)\n"
        "[t.join() for t in threads]\n"
        "_, status = os.waitpid(pid, 0)\n"
        "s = fused.tensor_cache_stats()\n"
        "print(os.waitstatus_to_exitcode(status), s['in_use'], s['hits'] > 0)\n", full=True)
    assert done.stdout.split() == ["0", "0", "True"], done.stderr[-3000:]


@pytest.mark.parametrize("dim,heads", [(32, 4), (48, 2)])
def test_fold_gates_kernels_match_the_pytorch_folds(kernels, dim, heads):
    # The layer's folded gate weights (w_g, gate_b, gate_c) from fold_gates, and every parameter's gradient through
    # them from fold_gates_backward, against the PyTorch route of the same layer in float64; in fp32 under bf16
    # autocast too (the folds' products must not run in bf16).
    from vision_lstm import layers
    torch.manual_seed(0)
    layer = layers.ViLLayer(dim, num_heads=heads)
    for p in layer.parameters():
        p.data.normal_(std=0.5)
    assert layers._fold_kernels(layer) is kernels
    reference = layers.ViLLayer(dim, num_heads=heads).double()
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    assert layers._fold_kernels(reference) is None  # (float64: the PyTorch route)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = layer._folded_projections()
    want = reference._folded_projections()
    cotangents = [torch.randn_like(o) for o in outs]
    got_grads = torch.autograd.grad(outs, list(layer.parameters()), cotangents, allow_unused=True)
    want_grads = torch.autograd.grad(want, list(reference.parameters()), [c.double() for c in cotangents],
                                     allow_unused=True)
    for got, ref in zip(outs, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for (name, _), got, ref in zip(layer.named_parameters(), got_grads, want_grads):
        assert (got is None) == (ref is None), name
        if got is not None:
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=name)
    with pytest.raises(RuntimeError, match="fold_gates takes contiguous float32"):
        kernels.fold_gates(*(t.double() for t in (layer.igate.weight, layer.fgate.weight, layer.q_proj.weight,
                                                   layer.k_proj.weight, layer.v_proj.weight, layer.q_proj.bias,
                                                   layer.k_proj.bias, layer.v_proj.bias,
                                                   layer.proj_up.weight[:layer.inner], layer.proj_up.bias[:layer.inner],
                                                   layer.igate.bias, layer.fgate.bias)))
