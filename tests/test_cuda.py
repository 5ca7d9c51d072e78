"""On a CUDA GPU (skipped elsewhere, so CI never runs these): our three forms and the model give on the GPU what they
give on the CPU, bf16 autocast stays within the tolerance the CPU tests state, and the Triton kernels of the xLSTM
authors' ``mlstm_kernels`` compute the same cell as an optional backend (mode ``kernels:chunkwise--triton_xl_chunk``).

Run with ``-s`` to see the measured errors; benchmarks/gpu_check.sh runs this file on a lent GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from test_cell import FORMS, _parallel_with_fixed_normaliser, make_inputs, rel_err
from vision_lstm import create_model
from vision_lstm.cell import mlstm, mlstm_parallel_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TRITON = "kernels:chunkwise--triton_xl_chunk"


def to(inputs, device, dtype=None):
    return [t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_() for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["parallel", "chunkwise8", "recurrent"])
def test_forms_on_cuda_agree_with_the_cpu_reference(form, dtype):
    cpu = make_inputs(T=37, gate_scale=5.0)  # float64, CPU
    grad_out = torch.randn(cpu[0].shape, dtype=torch.float64)
    ref = mlstm_parallel_reference(*cpu)
    ref_grads = torch.autograd.grad(ref, cpu, grad_out)
    gpu = to(cpu, "cuda", dtype)
    out = FORMS[form](*gpu)
    grads = torch.autograd.grad(out, gpu, grad_out.to("cuda", dtype))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    errors = {"h": rel_err(out.cpu().double(), ref)}
    errors.update({n: rel_err(g.cpu().double(), r) for n, g, r in zip("qkvif", grads, ref_grads)})
    print(f"\n{form} {dtype} on cuda vs float64 CPU reference: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= tol


def small_model(**kw):
    torch.manual_seed(0)
    return create_model("vil_tiny", img_size=32, patch_size=4, num_classes=10, depth=2, **kw)


def test_model_on_cuda_matches_the_cpu_and_bf16_stays_within_its_tolerance():
    model = small_model().eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        cpu = model.forward_features(x)
        model.cuda()
        gpu = model.forward_features(x.cuda()).cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.forward_features(x.cuda()).float().cpu()
    scale = cpu.abs().max()
    fp32_err, bf16_err = float((gpu - cpu).abs().max() / scale), float((bf16 - cpu).abs().max() / scale)
    print(f"\nmodel features, cuda vs cpu: fp32 {fp32_err:.1e}, bf16 autocast {bf16_err:.1e} (of the features' scale)")
    assert fp32_err < 1e-4
    assert 0 < bf16_err < 0.03  # the CPU tests' stated bf16 bound (tests/test_model.py)


@pytest.mark.parametrize("mode", ["parallel", TRITON])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_on_cuda_is_finite_and_learns(mode, precision):
    model = small_model(mlstm_mode=mode).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    losses = []
    for _ in range(20):  # one fixed batch: the loss must fall
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    print(f"\n{mode} {precision}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 20 steps on one batch")
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("T,DH", [(64, 96), (49, 32), (200, 64)])
def test_triton_kernel_computes_our_cell(T, DH):
    # The Triton kernel runs in fp32 with TF32 products (10-bit mantissa), on sequences padded to whole chunks of
    # 64 (49 -> 64, 200 -> 256). Its hand-written backward holds the normaliser and stabiliser fixed, as the
    # plain-PyTorch custom-backward kernel does (tests/test_cell.py): its gradients match that gradient to TF32
    # precision (measured on an H200: h <= 9e-3, gradients <= 5.5e-2, the worst q at DH = 96 where two TF32 products
    # chain) and differ from the true gradient of h by O(1) in q, k and both gates (measured 0.9-1.4).
    cpu = make_inputs(B=2, H=4, T=T, DH=DH, gate_scale=3.0)  # float64
    grad_out = torch.randn(cpu[0].shape, dtype=torch.float64)
    ref = mlstm(*cpu)
    true_grads = torch.autograd.grad(ref, cpu, grad_out)
    fixed_grads = torch.autograd.grad(_parallel_with_fixed_normaliser(*cpu), cpu, grad_out)
    gpu = to(cpu, "cuda", torch.float32)
    out = mlstm(*gpu, mode=TRITON, chunk_size=64)
    assert out.shape == ref.shape
    grads = [g.cpu().double() for g in torch.autograd.grad(out, gpu, grad_out.to("cuda", torch.float32))]
    h_err = rel_err(out.cpu().double(), ref)
    vs_fixed = {n: rel_err(g, r) for n, g, r in zip("qkvif", grads, fixed_grads)}
    vs_true = {n: rel_err(g, r) for n, g, r in zip("qkvif", grads, true_grads)}
    print(f"\nTriton T={T} DH={DH}: h {h_err:.1e}; grads vs fixed-normaliser "
          + ", ".join(f"{k} {v:.1e}" for k, v in vs_fixed.items())
          + "; vs true " + ", ".join(f"{k} {v:.1e}" for k, v in vs_true.items()))
    assert h_err < 2e-2
    assert max(vs_fixed.values()) < 0.1
    assert min(vs_true[n] for n in "qkif") > 0.3 and vs_true["v"] < 0.1  # v does not enter the normaliser


def test_model_with_the_triton_kernel_matches_the_parallel_form():
    model = small_model().cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model.forward_features(x)
        model.set_mlstm_mode(TRITON)
        out = model.forward_features(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = model.forward_features(x).float()
    scale = ref.abs().max()
    err, err_bf16 = float((out - ref).abs().max() / scale), float((out_bf16 - ref).abs().max() / scale)
    print(f"\nmodel features, Triton cell vs parallel: fp32 {err:.1e}, bf16 autocast {err_bf16:.1e}")
    assert err < 1e-2 and err_bf16 < 0.03
