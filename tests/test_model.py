"""The ViL model: official parameter counts, the three cell modes, resizing, the official-checkpoint converter."""
import pytest
import torch

from vision_lstm import VilError, create_model, list_models, load_official_state_dict
from vision_lstm import layers
from vision_lstm.layers import BlockDiagonalLinear, block_diagonal_matmul, interpolate_pos_embed
from vision_lstm.model import VisionLSTM


def small(**kw):
    args = dict(dim=32, depth=2, img_size=16, patch_size=4, num_classes=10)
    args.update(kw)
    return create_model("vil_tiny", **args)


@pytest.mark.parametrize("name,count", [("vil_tiny", 6_391_528), ("vil_small", 23_398_696),
                                        ("vil_base", 89_263_528)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 513


def test_hybrid_cifar_model_is_registered_with_a_conv_stem():
    model = create_model("vil_hybrid_cifar")
    assert model.config.stem == "conv" and model.config.grid == (8, 8)
    assert sum(p.numel() for p in model.parameters()) == 796_634  # the CIFAR-10 recipe's model
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_registry_lists_and_rejects():
    assert {"vil_tiny", "vil_small", "vil_base"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'vil_huge'; available: .*vil_tiny"):
        create_model("vil_huge")
    with pytest.raises(ValueError, match="unknown model argument.*widht"):
        create_model("vil_tiny", widht=3)


def test_forward_shapes_and_grid():
    model = small(img_size=(16, 24), in_chans=1)
    assert model.config.grid == (4, 6)
    assert model(torch.randn(3, 1, 16, 24)).shape == (3, 10)
    assert model.forward_features(torch.randn(2, 1, 16, 24)).shape == (2, 24, 32)


@pytest.mark.parametrize("pooling", ["bilateral_flatten", "bilateral_avg", "mean"])
def test_poolings(pooling):
    model = small(pooling=pooling, head_norm=False)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_modes_give_same_logits():
    torch.manual_seed(1)
    model = small(depth=2, chunk_size=5).eval()
    with torch.no_grad():  # random (not initial) weights so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model.set_mlstm_mode("parallel")(x)
        # kernels:...: the xLSTM authors' kernel as the backend (16 tokens padded to 4 chunks of 5)
        for mode in ("chunkwise", "recurrent", "kernels:chunkwise--native_autograd"):
            out = model.set_mlstm_mode(mode)(x)
            assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-4, mode
    built = small(mlstm_mode="recurrent")
    assert built.config.mlstm_mode == "recurrent"


def test_model_gradients_flow_to_every_parameter():
    model = small()
    model.head.weight.data.normal_()  # the official init (std 2e-5) would make upstream gradients tiny
    loss = model(torch.randn(2, 3, 16, 16)).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_block_diagonal_linear_matches_dense():
    layer = BlockDiagonalLinear(16, 4)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    dense = torch.block_diag(*layer.weight)
    x = torch.randn(5, 7, 16)
    assert torch.allclose(layer(x), x @ dense.T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("blocks, block_in, block_out", [(96, 4, 4), (10, 4, 4), (3, 5, 2), (2, 16, 16)])
def test_block_diagonal_gradients_match_dense(blocks, block_in, block_out, amx, monkeypatch):
    # The super-block convolution forward and the hand-written backward (transposed super-block convolution for the
    # input, super-block matmul for the weight) against autograd through the dense matrix, in float64. With AMX
    # (32-channel convolution super-blocks) 96 blocks of 4 take 32-channel super-blocks, 10 blocks of 4 (40
    # channels) 20-channel ones; without (8 channels) both take 8-channel ones; 2 of 16 one 32-channel super-block
    # or the 16-channel blocks themselves, 3 x (2 x 5) the rectangular fallback (the blocks themselves).
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: amx)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, blocks * block_in, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(blocks, block_out, block_in, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(blocks * block_out, dtype=torch.float64, generator=gen, requires_grad=True)
    y = block_diagonal_matmul(x, w, b)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    expected_y = x @ torch.block_diag(*w).T + b
    for got, expected in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(expected_y, (x, w, b), g)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels", [384, 128, 40])
def test_block_outer_sum_is_the_same_for_every_super_block_width(channels):
    # The weight gradient keeps the diagonal 4 x 4 blocks of wider products: any width gives the same blocks up to
    # the order of the additions (bf16 operands, fp32 accumulation, one rounding), checked against float64.
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(1000, channels, generator=gen).to(torch.bfloat16) for _ in range(2))
    expected = torch.einsum("nbo,nbi->boi", a.double().view(1000, -1, 4), b.double().view(1000, -1, 4))
    for group in (4, 32, 128):
        got = layers._block_outer_sum(a, b, 4, group)
        assert got.shape == (channels // 4, 4, 4) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), expected, rtol=8e-3, atol=8e-3 * expected.abs().max().item())


def test_block_diagonal_conv_width_is_8_on_cpus_without_amx(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: True)
    assert layers._conv_group(x) == 32
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: False)
    assert layers._conv_group(x) == 8
    assert layers._super_block_size(384, 4, layers._conv_group(x)) == 8


def test_block_outer_sum_width_is_wide_only_for_bf16_on_amx(monkeypatch):
    bf16, fp32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: True)
    assert (layers._outer_sum_group(bf16), layers._outer_sum_group(fp32)) == (128, 32)
    monkeypatch.setattr(layers, "_cpu_has_amx", lambda: False)
    assert (layers._outer_sum_group(bf16), layers._outer_sum_group(fp32)) == (32, 32)


def test_block_diagonal_under_autocast_runs_in_bf16_with_fp32_gradients():
    x = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(16, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block_diagonal_matmul(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32
    expected_w = torch.einsum("nbo,nbi->boi", torch.ones(4, 16, 4), x.detach().view(4, 16, 4))
    torch.testing.assert_close(w.grad, expected_w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("block_size", [4, 8])
def test_head_major_projections_match_the_pytorch_route(autocast, block_size):
    # The CPU kernels' q, k, v projections (head-major memory, fused input gradient of c) against
    # BlockDiagonalLinear's own route (head views of its token-major outputs): same values and the same gradients
    # for c, x_m and every weight and bias, in fp32 and under bf16 autocast (there within bf16 rounding).
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    gen = torch.Generator().manual_seed(0)
    B, T, H, inner = 3, 10, 4, 64
    projections = [BlockDiagonalLinear(inner, block_size) for _ in range(3)]
    for p in projections:
        torch.nn.init.normal_(p.weight, generator=gen)
        torch.nn.init.normal_(p.bias, generator=gen)
    c0, x0 = (torch.randn(B, T, inner, generator=gen) for _ in range(2))
    weights = [torch.randn(B, H, T, inner // H, generator=gen) for _ in range(3)]

    def run(kernel_route):
        c, x_m = (t.clone().requires_grad_() for t in (c0, x0))
        for p in projections:
            p.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if kernel_route:
                heads = layers.head_major_projections(c, x_m, H, *projections)
                assert heads is not None and all(t.is_contiguous() for t in heads)
            else:
                heads = [p(t).view(B, T, H, -1).transpose(1, 2) for p, t in zip(projections, (c, c, x_m))]
        sum((h.float() * w).sum() for h, w in zip(heads, weights)).backward()
        grads = [c.grad, x_m.grad] + [t.grad for p in projections for t in (p.weight, p.bias)]
        return [h.detach().float() for h in heads], grads

    (heads, grads), (want_heads, want_grads) = run(True), run(False)
    tolerance = dict(rtol=1e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for got, want in zip(heads, want_heads):
        torch.testing.assert_close(got, want, **tolerance)
    for got, want in zip(grads, want_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=tolerance["rtol"], atol=tolerance["atol"] * want.abs().max().item())


@pytest.mark.parametrize("lanes", [8, 16])
def test_blocks_wider_than_the_kernels_vectors_take_the_pytorch_route(monkeypatch, lanes):
    # The block-diagonal kernels hold whole blocks per vector: 16-channel blocks need 16-lane vectors (AVX-512). On
    # a build with 8-lane vectors (AVX2) the layer takes PyTorch's route for them, and the same values come out.
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setattr(fused, "vector_lanes", lambda: lanes)
    c, x_m = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    assert layers._block_kernels(c, torch.float32, 8) is not None
    assert (layers._block_kernels(c, torch.float32, 16) is not None) == (lanes == 16)
    if lanes == 8:  # (with 16 the kernels would run: on an 8-lane build they refuse, as test_fused checks)
        assert layers.head_major_projections(c, x_m, 4, *[BlockDiagonalLinear(64, 16) for _ in range(3)]) is None
    layer = layers.ViLLayer(32, num_heads=4, qkv_block_size=16)  # inner 64: 16 channels a head, one block each
    assert (layer._head_kernels(x_m) is not None) == (lanes == 16)


def test_layer_with_16_channel_blocks_gives_the_pytorch_routes_values():
    # On this machine's build, whatever its vector width: a layer with 16-channel q, k, v blocks (the kernels where
    # the vectors hold them, else PyTorch's route) against PyTorch's route for the projections
    torch.manual_seed(0)
    layer = layers.ViLLayer(32, num_heads=4, qkv_block_size=16)
    x = torch.randn(2, 16, 32)

    def run():
        layer.zero_grad()
        out = layer(x, (4, 4))
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in layer.parameters()]

    got = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layers, "_block_kernels", lambda *args: None)
        want = run()
    for g, w in zip(got, want):  # fp32 sums in another order: within 1e-5 of each tensor's largest entry (gradients
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * w.abs().max().item())  # reach hundreds here)


def test_layer_makes_no_head_major_copies_of_q_k_v(monkeypatch):
    # With the CPU kernels, q, k, v come out of their projections in the head-major layout the cell works in, h is
    # written in the token-major layout the output path reads, and the gradients go back the same way: a training
    # step copies no (B, T, inner)-sized tensor between layouts (the PyTorch route made nine such copies per layer).
    # Nor does autograd add (B, T, inner)-sized gradients: c's (skip, gates, q, k) and x_m's (conv, v) are summed by
    # the kernels that compute them (three such additions per layer before session 27), and no addmm copies such a
    # gradient as its addend (one per layer before session 29).
    from torch.utils._python_dispatch import TorchDispatchMode
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    B, T, dim = 4, 16, 32

    class CountCopies(TorchDispatchMode):
        count = additions = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and out.numel() == B * T * 2 * dim:
                CountCopies.count += 1
            if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and out.shape == (B, T, 2 * dim):
                CountCopies.additions += 1
            if func == torch.ops.aten.addmm.default and args[0].numel() == B * T * 2 * dim:
                CountCopies.count += 1  # addmm(addend, a, b) copies a full-size addend into its output first
            return out

    layer = layers.ViLLayer(dim)
    x = torch.randn(B, T, dim, requires_grad=True)
    for autocast in (False, True):
        CountCopies.count = CountCopies.additions = 0
        with CountCopies():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x, (4, 4))
            y.float().sum().backward()
        assert CountCopies.count == 0, (autocast, CountCopies.count)
        assert CountCopies.additions == 0, (autocast, CountCopies.additions)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_inference_computes_q_k_v_inside_the_cell(precision):
    # Without gradients, in fp32 (with the CPU kernels) or under bf16 autocast (on a CPU with AVX512-BF16), the
    # cell's kernel computes q, k, v from c and x_m itself and ends with the layer's output path
    # (cell.mlstm_parallel_projected with output=...): no projection writes them out, no gated norm pass reads h
    # back, and the outputs are the bits of the path that does (the same model with gradients on). A reversed block,
    # a grid that is not square.
    from torch.utils._python_dispatch import TorchDispatchMode
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    if precision == "bf16" and not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: inference in bf16 writes q, k, v out")
    torch.manual_seed(0)
    model = create_model("vil_tiny", depth=2, dim=48, num_heads=4, img_size=(16, 24), patch_size=4,
                         num_classes=10).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the zero/identity init, so every term counts
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(3, 3, 16, 24)

    class CountKernels(TorchDispatchMode):
        calls: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            CountKernels.calls[name] = CountKernels.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        want = model(x)  # gradients on: projections, then the cell
        with torch.no_grad(), CountKernels():
            got = model(x)
    assert CountKernels.calls.get("vision_lstm_cpu.block_diag_mm", 0) == 0
    assert CountKernels.calls.get("vision_lstm_cpu.gated_norm_forward", 0) == 0
    assert CountKernels.calls.get(f"vision_lstm_cpu.forward_{precision}_projected_gated", 0) == 4  # 2 pairs of blocks
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(1, 16, 8), (37, 48, 24), (300, 192, 384), (256, 384, 192), (130, 192, 8)])
def test_bias_fused_linear_gives_the_bits_of_addmm(shape):
    # linear_rows: oneDNN's linear with the bias fused, in bf16 and (fuse_fp32, from 32 rows) fp32, where the probe
    # finds it; addmm's bits either way (rows from 1 to a few hundred, ViL-T's widths and the gates' 8 outputs).
    N, K, M = shape
    torch.manual_seed(0)
    x, w, b = torch.randn(N, K), torch.randn(M, K), torch.randn(M)
    for dtype in (torch.bfloat16, torch.float32):
        args = (x.to(dtype), w.to(dtype), b.to(dtype))
        assert torch.equal(layers.linear_rows(*args, fuse_fp32=True), torch.addmm(args[2], args[0], args[1].t()))
    assert torch.equal(layers.linear_rows(x, w, None), x @ w.t())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_products_fuse_their_bias(dtype):
    # Under bf16 autocast the layer's products with a bias (x_m, z, the gates' part from x, the down-projection)
    # run oneDNN's linear with the bias fused (linear_rows), not addmm, which first writes the bias over its output:
    # 4 per layer in training (the down-projection since session 32) and in inference, with the same bits. In fp32
    # (since session 36) in inference only.
    from torch.utils._python_dispatch import TorchDispatchMode
    if not layers._bias_fused_linear_works(dtype):
        pytest.skip("oneDNN's linear with a fused bias is not available here: the products use addmm")
    torch.manual_seed(0)
    model = create_model("vil_tiny", depth=2, dim=48, num_heads=4, img_size=16, patch_size=4, num_classes=10)
    x = torch.randn(2, 3, 16, 16)  # 2 images x 16 tokens: 32 rows, as many as fp32 takes the fused route from

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func == torch.ops.mkldnn._linear_pointwise.default
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with Count():
            want = model(x)
        assert Count.calls == (4 * 4 if dtype == torch.bfloat16 else 0)  # 2 pairs of blocks
        Count.calls = 0
        with torch.no_grad(), Count():
            got = model(x)
        assert Count.calls == 4 * 4
    assert torch.equal(got, want)


def _layer_with_inputs():
    """A ViL layer (dim 32, 4 heads) with its norm, skip and gate weights away from their init, an input and an
    output gradient for a 4 x 6 grid (B 3): (layer, x, grad_y)."""
    torch.manual_seed(0)
    layer = layers.ViLLayer(32, num_heads=4)
    for param in (layer.outnorm.weight, layer.outnorm.bias, layer.learnable_skip, layer.igate.weight,
                  layer.fgate.weight):
        param.data.normal_(std=0.5)
    return layer, torch.randn(3, 24, 32), torch.randn(3, 24, 32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_computes_q_k_v_inside_the_cells_kernels(monkeypatch, precision):
    # With the CPU kernels, in fp32 or under bf16 autocast (on a CPU with AVX512-BF16), the cell's whole-forward and
    # whole-backward kernels compute q, k, v from c and x_m themselves (forward_*_projected, backward_*_projected):
    # the projections never write them out (no block_diag_mm for them, forward or backward; rebuild is not called).
    # The backward kernel also takes the projections' backward (backward_fp32_projected_sources,
    # backward_bf16_projected_sources: no block_diag_mm or block_diag_outer at all) and the conv's backward sums
    # c's and x_m's gradients: the same values as the routes that write q, k, v out, within fp32 rounding (the sums
    # run in another order) or, under bf16 autocast, within bf16 rounding (those routes round q's, k's and v's
    # gradients to bf16 before the projections' backward; the kernel sums them in fp32), with the forward's output
    # the same bits. Those two routes (the projections in forward and the backward kernel computing them again, or
    # the projections in forward and again for backward: rebuild) give each other's bits. A 4 x 6 grid.
    from torch.utils._python_dispatch import TorchDispatchMode
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    if precision == "bf16" and not fused.has_bf16_scores():
        pytest.skip("this CPU has no AVX512-BF16: the cell reads q, k, v in bf16")
    layer, x0, grad_y = _layer_with_inputs()
    rebuilds = []
    real_again = layers.ViLLayer._qkv_heads_again
    monkeypatch.setattr(layers.ViLLayer, "_qkv_heads_again", lambda *a: rebuilds.append(1) or real_again(*a))

    class CountProjections(TorchDispatchMode):
        calls = 0
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name == "vision_lstm_cpu.block_diag_mm" and args[2] is not None:
                CountProjections.calls += 1  # with a bias: q's, k's or v's projection (backward's have none)
            if name.startswith("vision_lstm_cpu."):
                CountProjections.ops.append(name.split(".")[1])
            return func(*args, **(kwargs or {}))

    def run():
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        rebuilds.clear()
        CountProjections.calls = 0
        CountProjections.ops = []
        with CountProjections():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = layer(x, (4, 6))
            y.float().backward(grad_y)
        return [y, x.grad] + [p.grad.clone() for p in layer.parameters()], CountProjections.calls, len(rebuilds)

    def same(got, want):
        tolerance = 2 ** -6 if precision == "bf16" else 1e-6
        return all(torch.allclose(a.float(), b.float(), rtol=0, atol=tolerance * b.abs().max().item())
                   for a, b in zip(got, want))

    got, projections, rebuilt = run()
    assert (projections, rebuilt) == (0, 0)
    sources_backward = f"backward_{precision}_projected_sources"
    taken_inside = {sources_backward, "conv_silu_backward_summed"}
    assert taken_inside <= set(CountProjections.ops)
    assert not {"block_diag_mm", "block_diag_outer", "conv_silu_backward"} & set(CountProjections.ops)
    monkeypatch.setattr(layers, "projected_training_applies", lambda *a: False)  # q, k, v written in forward
    want, projections, rebuilt = run()
    assert (projections, rebuilt) == (3, 0)
    assert not taken_inside & set(CountProjections.ops)
    assert same(got, want)
    assert torch.equal(got[0], want[0])  # the forward's output: the same bits
    assert not all(torch.equal(a, b) for a, b in zip(got, want))  # (the gradients: another order, other roundings)
    monkeypatch.setattr(layers, "ProjectedSources", lambda *a: None)  # and no sources for backward: rebuild
    again, projections, rebuilt = run()
    assert (projections, rebuilt) == (6, 1)
    assert all(torch.equal(a, b) for a, b in zip(again, want))


@pytest.mark.parametrize("autocast", [False, True])
def test_layer_kernels_match_the_pytorch_route(monkeypatch, autocast):
    # A whole ViL layer with the CPU kernels (conv + SiLU, the output path, the q/k/v projections: layer_kernels)
    # against the same layer with PyTorch's route for all of them: output, input gradient and every parameter's
    # gradient, in fp32 and under bf16 autocast (there within bf16 rounding: autocast rounds the conv's weights to
    # bf16, the kernels do not, and the PyTorch route rounds between its passes). A 4 x 6 grid: not square.
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    layer, x0, grad_y = _layer_with_inputs()

    def run():
        x = x0.clone().requires_grad_()
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x, (4, 6))
        y.float().backward(grad_y)
        return y.detach().float(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    calls = []
    real = layers.layer_kernels
    monkeypatch.setattr(layers, "layer_kernels", lambda *a: calls.append(1) or real(*a))
    y, grad_x, grads = run()
    # conv + SiLU with the projections, output path, down-projection; the projections again and the up-projections'
    # bias sums in backward (the projections not again where the cell's whole backward computes q, k, v itself: in
    # fp32 everywhere, under bf16 autocast with AVX512-BF16); in fp32 also whether z's bias goes to the output path
    assert len(calls) == (5 if not autocast else 4 if fused.has_bf16_scores() else 5)
    monkeypatch.setattr(layers, "layer_kernels", lambda *a: None)
    want_y, want_grad_x, want_grads = run()
    rtol, atol = (3e-2, 3e-2) if autocast else (1e-4, 1e-5)
    for got, want, name in [(y, want_y, "y"), (grad_x, want_grad_x, "x")] + [(grads[n], want_grads[n], n)
                                                                          for n in grads]:
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_fp32_training_leaves_zs_bias_to_the_output_paths_kernel(monkeypatch, autocast):
    # In fp32 training the up-projection computes z without its bias and the output path's kernel adds it (and sums
    # its gradient); under bf16 autocast (whose product fuses the bias) the up-projection keeps it. Either way the
    # bias gets the same gradient as through a plain linear: checked against the layer's reference path.
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    layer, x0, grad_y = _layer_with_inputs()
    layer.proj_up.bias.data.normal_()
    seen = {}
    up, norm = layers._UpProjections.apply, layers._GatedHeadNormKernel.apply
    monkeypatch.setattr(layers._UpProjections, "apply", lambda *a: seen.update(up_z_bias=a[5]) or up(*a))
    monkeypatch.setattr(layers._GatedHeadNormKernel, "apply", lambda *a: seen.update(norm_z_bias=a[-1]) or norm(*a))

    def run():
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            layer(x0, (4, 6)).float().backward(grad_y)
        return layer.proj_up.bias.grad.clone()
    got = run()
    assert (seen["up_z_bias"] is None) != autocast and (seen["norm_z_bias"] is None) == autocast
    layer.reference_path = True
    want = run()
    tol = 3e-2 if autocast else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_kernels_match_the_pytorch_route(monkeypatch, autocast, reverse):
    # A ViL block with the CPU kernels (its input norm writing the layer's dtype and order, the reversed residual
    # sum, and the layer's own kernels) against PyTorch's route for all of them: output and every gradient, fp32 and
    # bf16 autocast, both traversal directions. With drop path active (training) the sum takes PyTorch's route.
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    torch.manual_seed(0)
    block = layers.ViLBlock(32, reverse=reverse, num_heads=4)
    for param in (block.norm.weight, block.norm.bias, block.layer.outnorm.weight, block.layer.learnable_skip):
        param.data.normal_(std=0.5)
    x0, grad_y = torch.randn(3, 24, 32), torch.randn(3, 24, 32)

    def run():
        x = x0.clone().requires_grad_()
        block.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(x, (4, 6))
        y.backward(grad_y)
        return y.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}

    y, grad_x, grads = run()
    assert y.dtype == torch.float32  # the residual stream keeps x's dtype
    real = layers.layer_kernels
    monkeypatch.setattr(layers, "layer_kernels", lambda *a: None)
    want_y, want_grad_x, want_grads = run()
    rtol, atol = (3e-2, 3e-2) if autocast else (1e-4, 1e-5)
    for got, want, name in [(y, want_y, "y"), (grad_x, want_grad_x, "x")] + [(grads[n], want_grads[n], n)
                                                                          for n in grads]:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), msg=name)
    # drop path in training: same random mask on both routes
    monkeypatch.setattr(layers, "layer_kernels", real)
    block.drop_path.drop_prob = 0.5
    torch.manual_seed(1)
    dropped = run()[0]
    monkeypatch.setattr(layers, "layer_kernels", lambda *a: None)
    torch.manual_seed(1)
    torch.testing.assert_close(dropped, run()[0], rtol=rtol, atol=atol * max(1.0, dropped.abs().max().item()))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_block_backward_adds_no_token_gradients(reverse, autocast):
    # A block's input x feeds its norm and its residual sum, and the normalised tokens feed the layer's three input
    # products. With the CPU kernels the norm's backward pass adds the residual path's gradient as it writes x's,
    # and the products accumulate their input gradient themselves: autograd adds no (B, T, D) gradients (two per
    # block before session 27), in fp32 and under autocast.
    from torch.utils._python_dispatch import TorchDispatchMode
    from vision_lstm import fused
    if fused.ops() is None:
        pytest.skip("the CPU kernels could not be built here")
    B, T, dim = 4, 16, 32

    class CountAdditions(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and out.shape == (B, T, dim):
                CountAdditions.count += 1
            return out

    torch.manual_seed(0)
    block = layers.ViLBlock(dim, reverse=reverse, num_heads=4)
    x = torch.randn(B, T, dim, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x, (4, 4))
    with CountAdditions():
        y.sum().backward()
    assert CountAdditions.count == 0
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_bf16_autocast_matches_fp32_within_bf16_rounding():
    # Under autocast the projections and the output path (norm, skip, output gate) run in bf16, and so do the
    # cell's T x T products except the scores (its gating, stabiliser and normaliser stay fp32).
    # Stated tolerance: features within 3 % of their scale (bf16 keeps 8 bits; a few roundings per block), and the
    # bf16 fast path agrees with the bf16 plain reference path to the same bound. Without the learnable skip or the
    # norm's affine in the bf16 output path the error is O(1).
    torch.manual_seed(0)
    model = small(depth=2).eval()
    for block in (b for pair in model.blocks for b in (pair.forward_block, pair.backward_block)):
        for param in (block.layer.outnorm.weight, block.layer.outnorm.bias, block.layer.learnable_skip):
            param.data.normal_(std=0.5)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = model.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model.forward_features(x).float()
            model.use_reference_path()
            plain = model.forward_features(x).float()
    scale = ref.abs().max()
    assert (fast - ref).abs().max() < 0.03 * scale
    assert (fast - plain).abs().max() < 0.03 * scale
    assert (fast - ref).abs().max() > 0  # bf16 did run


def test_init_matches_official_recipe():
    model = create_model("vil_tiny", depth=1)
    layer = model.blocks[0].forward_block.layer
    assert torch.allclose(layer.fgate.bias, torch.linspace(3.0, 6.0, 4))
    assert layer.fgate.weight.abs().sum() == 0 and layer.igate.weight.abs().sum() == 0
    assert torch.all(layer.learnable_skip == 1)
    assert abs(layer.proj_up.weight.std().item() - (2 / (5 * 192)) ** 0.5) < 0.003
    assert abs(layer.proj_down.weight.std().item() - 2 / 192 ** 0.5) < 0.01
    assert abs(model.head.weight.std().item() - 2e-5) < 2e-6  # trunc_normal_(std=2e-5), as the official (MAE) head
    assert torch.all(model.blocks[0].forward_block.norm.weight == 0)  # offset scale: effective 1 + w


def test_pos_embed_interpolation():
    embed = torch.randn(1, 4, 4, 8)
    assert interpolate_pos_embed(embed, (4, 4)) is embed
    bigger = interpolate_pos_embed(embed, (8, 6))
    assert bigger.shape == (1, 8, 6, 8)
    # A constant embedding stays constant under bicubic resizing.
    const = torch.ones(1, 4, 4, 3)
    assert torch.allclose(interpolate_pos_embed(const, (7, 5)), torch.ones(1, 7, 5, 3), atol=1e-5)
    # A model at another resolution accepts the input and interpolates on the fly.
    model = small()
    assert model(torch.randn(1, 3, 24, 24)).shape == (1, 10)


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="image size 30x30 is not divisible by patch_size 4"):
        create_model("vil_tiny", img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown mlstm_mode 'fast'"):
        create_model("vil_tiny", mlstm_mode="fast")
    with pytest.raises(ValueError, match="unknown pooling"):
        create_model("vil_tiny", pooling="max")
    model = small()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(2, 3, 18, 16))
    with pytest.raises(ValueError, match="unknown mlstm_mode"):
        model.set_mlstm_mode("nope")


# --- official checkpoint layouts ------------------------------------------------------------------------------

def official_hub_state_dict(model: VisionLSTM) -> dict:
    """What the official VisionLSTM2 (torch.hub layout) calls each of our tensors, built independently of convert.py."""
    out = {}
    for key, value in model.state_dict().items():
        k = key.replace(".forward_block.", ".rowwise_from_top_left.").replace(
            ".backward_block.", ".rowwise_from_bot_right.")
        for gate in ("igate", "fgate", "outnorm"):
            k = k.replace(f".layer.{gate}.", f".layer.mlstm_cell.{gate}.")
        k = k.replace("head_norm.", "legacy_norm.")
        out[k] = value.clone()
    return out


def official_raw_state_dict(model: VisionLSTM) -> dict:
    """The raw training layout: flat blocks, .xlstm./.xlstm_norm./.conv1d., post_blocks_norm, head.0/head.1."""
    hub = official_hub_state_dict(model)
    raw = {}
    for key, value in hub.items():
        k = key
        for pair in range(model.config.depth):
            k = k.replace(f"blocks.{pair}.rowwise_from_top_left.", f"blocks.{2 * pair}.")
            k = k.replace(f"blocks.{pair}.rowwise_from_bot_right.", f"blocks.{2 * pair + 1}.")
        k = k.replace(".layer.conv.", ".xlstm.conv1d.").replace(".layer.", ".xlstm.").replace(".norm.", ".xlstm_norm.")
        if k.startswith("norm."):
            k = k.replace("norm.", "post_blocks_norm.", 1)
        k = k.replace("legacy_norm.", "head.0.")
        if k.startswith("head.") and not k.startswith("head.0."):
            k = k.replace("head.", "head.1.", 1)
        raw[k] = value
    return {"state_dict": raw, "ctor_kwargs": {}}


def randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_hub_layout_has_official_key_names():
    keys = set(official_hub_state_dict(create_model("vil_tiny")))
    assert len(keys) == 513
    assert "blocks.3.rowwise_from_bot_right.layer.proj_up.weight" in keys
    assert "blocks.0.rowwise_from_top_left.layer.mlstm_cell.fgate.bias" in keys
    assert {"pos_embed.embed", "legacy_norm.weight", "norm.weight", "head.weight"} <= keys


@pytest.mark.parametrize("layout", ["hub", "raw"])
def test_converter_loads_both_layouts(layout):
    source = randomised(small(depth=2)).eval()
    sd = official_hub_state_dict(source) if layout == "hub" else official_raw_state_dict(source)
    target = load_official_state_dict(small(depth=2), sd).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_converter_interpolates_pos_embed():
    source = randomised(small())
    target = load_official_state_dict(small(img_size=32), official_hub_state_dict(source))
    assert target.pos_embed.embed.shape == (1, 8, 8, 32)


def test_converter_names_mismatched_keys():
    sd = official_hub_state_dict(small(depth=2))
    del sd["blocks.1.rowwise_from_top_left.layer.proj_up.weight"]
    sd["blocks.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(VilError) as err:
        load_official_state_dict(small(depth=2), sd)
    message = str(err.value)
    assert "missing keys: blocks.1.forward_block.layer.proj_up.weight" in message
    assert "unexpected keys: blocks.9.extra.weight" in message
    with pytest.raises(VilError, match=r"do not fit the model: mis-shaped keys: .*\(64,\) vs model \(128,\)"):
        load_official_state_dict(small(dim=64), official_hub_state_dict(small()))


def test_reference_path_matches_fast_path():
    torch.manual_seed(2)
    model = randomised(small(depth=2))
    x = torch.randn(3, 3, 16, 16)
    fast = model(x)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    ref = model.use_reference_path()(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    assert ((fast - ref).abs().max() / ref.abs().max()) <= 1e-5
    for (name, _), a, b in zip(model.named_parameters(), fast_grads, ref_grads):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) <= 1e-4, name


def test_conv_stem():
    model = small(stem="conv", img_size=32, patch_size=4)
    assert model.config.grid == (8, 8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        small(stem="conv", img_size=30, patch_size=3)
    with pytest.raises(ValueError, match="unknown stem"):
        small(stem="resnet")


def _saved_bytes(model, x) -> tuple[int, dict]:
    """Bytes autograd keeps for backward during one forward, and the resulting gradients."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return saved, grads


def test_grad_checkpointing_same_gradients_less_saved_memory():
    torch.manual_seed(0)
    model = create_model("vil_tiny", dim=32, depth=4, img_size=16, patch_size=4, num_classes=5, drop_path_rate=0.3)
    model.head.weight.data.normal_()  # the official init (std 2e-5) would make upstream gradients tiny
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(1)  # the same drop-path draws in both runs
    plain_bytes, plain = _saved_bytes(model, x)
    torch.manual_seed(1)
    ckpt_bytes, ckpt = _saved_bytes(model.set_grad_checkpointing(), x)
    assert model.grad_checkpointing
    for name in plain:  # recomputation replays the drop-path draws: identical gradients up to rounding
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # Only the block pairs' inputs are kept (recomputation happens in backward, outside the hook's forward).
    assert ckpt_bytes < plain_bytes / 4, (ckpt_bytes, plain_bytes)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), model.set_grad_checkpointing(False)(x))


def test_grad_checkpointing_under_bf16_autocast_gives_the_same_gradients():
    # Recomputing the blocks in backward under bf16 autocast (where the cell's kernels compute q, k, v themselves
    # and the whole backward is one kernel, on CPUs with AVX512-BF16): the same gradients, bit for bit.
    torch.manual_seed(0)
    model = create_model("vil_tiny", dim=32, depth=4, img_size=16, patch_size=4, num_classes=5, drop_path_rate=0.3)
    model.head.weight.data.normal_()
    x = torch.randn(4, 3, 16, 16)

    def grads(checkpointing):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        assert torch.equal(recomputed[name], plain[name]), name


def _unique_saved_bytes(model, x, autocast: bool) -> int:
    """Bytes of the distinct storages autograd keeps for backward during one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_fast_path_keeps_less_for_backward_than_the_plain_path(autocast):
    # The fast path saves only the inputs of the output path (norm, skip, gate: recomputed in backward), reads the
    # cell's output in place, and under autocast keeps the T x T matrices in bf16. Measured for this model: 0.56x
    # of the plain path's bytes in fp32, 0.51x under bf16 autocast; before those changes 0.71x and 0.76x.
    torch.manual_seed(0)
    model = small(dim=64, depth=2, img_size=32)
    x = torch.randn(8, 3, 32, 32)
    fast = _unique_saved_bytes(model, x, autocast)
    plain = _unique_saved_bytes(model.use_reference_path(), x, autocast)
    assert fast < 0.65 * plain, fast / plain


@pytest.mark.parametrize("autocast", [False, True])
def test_cell_rebuilds_q_k_v_in_backward_instead_of_keeping_them(monkeypatch, autocast):
    # The layer hands the parallel cell a callable that recomputes q, k, v from c and x_m (kept anyway): the same
    # gradients (within fp32 rounding, as the cell's backward kernel then also takes the projections' backward,
    # summing in another order; under bf16 autocast within bf16 rounding, as that kernel sums the projections'
    # gradients from fp32 dq, dk, dv where the route without rebuild rounds them to bf16 first), and exactly three
    # (B, H, T, DH) tensors per layer fewer kept from forward to backward.
    from vision_lstm import layers
    torch.manual_seed(0)
    model = create_model("vil_tiny", dim=32, depth=2, img_size=16, patch_size=4, num_classes=5)
    model.head.weight.data.normal_()
    x = torch.randn(4, 3, 16, 16)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return grads

    rebuilt, rebuilt_bytes = run(), _unique_saved_bytes(model, x, autocast)
    keep_all = layers.mlstm
    # (without rebuild, q, k, v must be computed by the projections and passed: no sources for the cell's kernels)
    monkeypatch.setattr(layers, "projected_training_applies", lambda *a: False)
    monkeypatch.setattr(layers, "mlstm", lambda *args, rebuild=None, sources=None, **kwargs: keep_all(*args, **kwargs))
    kept, kept_bytes = run(), _unique_saved_bytes(model, x, autocast)
    for name in kept:
        # (bf16: 1.7 % of the largest gradient at most for this model; against the gradients in fp32, the rebuilt
        # route's errors are the smaller: 1.05 % against 1.09 % of all the gradients' norm, session 42)
        tolerance = 2 ** -5 if autocast else 1e-5
        torch.testing.assert_close(rebuilt[name], kept[name], rtol=0, atol=tolerance * kept[name].abs().max().item())
    n_layers, tokens, inner = 4, 16, 64  # depth 2 = two pairs of layers; 4x4 patches; expansion 2
    assert kept_bytes - rebuilt_bytes == n_layers * 3 * x.shape[0] * tokens * inner * (2 if autocast else 4)


def test_gated_head_norm_output_gradients():
    from vision_lstm.layers import MultiHeadNorm, _GatedHeadNormOutput, gated_head_norm_output
    torch.manual_seed(0)
    B, T, H, DH = 2, 5, 3, 4
    norm = MultiHeadNorm(H * DH, H).double()
    args = [torch.randn(B, T, H, DH), torch.randn(B, T, H * DH), torch.randn(B, T, H * DH), torch.randn(H * DH),
            torch.randn(H * DH), torch.randn(H * DH)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: _GatedHeadNormOutput.apply(*a, norm.eps), args)
    h, c, z, weight, bias, skip = args
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    plain = (norm(h.reshape(B, T, H * DH)) + skip * c) * torch.nn.functional.silu(z)
    torch.testing.assert_close(gated_head_norm_output(h, c, z, norm, skip), plain)
    with pytest.raises(ValueError, match="expected"):
        gated_head_norm_output(h.reshape(B, T, 2, -1), c, z, norm, skip)


@pytest.mark.parametrize("env, expected", [
    ({}, "on"),
    ({"VIL_MALLOC": "default"}, "off (VIL_MALLOC=default)"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "off (left to MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "off (left to GLIBC_TUNABLES)"),
])
def test_import_keeps_freed_memory_unless_told_otherwise(env, expected):
    # Importing the package sets glibc up to keep freed memory (runtime.py); a user's own malloc tuning or
    # VIL_MALLOC=default leaves glibc alone.
    import os
    import platform
    import subprocess
    import sys
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("VIL_MALLOC", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                          "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", "import vision_lstm; print(vision_lstm.MALLOC_SETTING)"],
                         env={**clean, **env}, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


def test_inference_does_not_import_torchdynamo():
    # Importing TorchDynamo is about half of `import vision_lstm` (1.2 of 2.5 s): only compiling users should pay it
    # (a training step pays it anyway, in the optimizer). Fails if mlstm_parallel is decorated at import again.
    import subprocess
    import sys

    code = ("import sys, torch, vision_lstm\n"
            "model = vision_lstm.create_model('vil_tiny', img_size=16, num_classes=10, depth=1).eval()\n"
            "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
            "    model(torch.randn(2, 3, 16, 16))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_compile_keeps_the_parallel_cell_eager():
    # torch.compile traces the model around the fast parallel cell and never into it (compiling the cell too was
    # much slower to build and to run, cell.mlstm_parallel). A recording backend sees every captured graph: the
    # model's projections are there, the cell's own operations (cummax: only the cell uses it) are not. Training
    # through the compiled model (AOT autograd, no inductor: fast) gives eager's output and gradients.
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = small(depth=1).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        got = torch.compile(model, backend=record)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, expected)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op.startswith("call")]
    assert any("linear" in t for t in targets), targets
    assert not any("cummax" in t for t in targets), targets

    model.train()
    expected_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    got_grads = torch.autograd.grad(torch.compile(model, backend="aot_eager")(x).square().sum(),
                                    list(model.parameters()))
    torch._dynamo.reset()
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)
