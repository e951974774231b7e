"""The CUDA kernels of odconv2d (csrc/cuda/) against the reference, the CPU kernels and themselves.

Everything but test_cuda_build_registers_cuda_kernels and test_cuda_source_emulated_on_cpu needs a GPU
and is skipped without one. On a GPU machine a missing CUDA kernel fails the tests (it is not
skipped). Tolerances are those of conftest.tolerances for the dtype, the absolute one scaled by the
magnitude of the expected value for gradients (which are sums over the batch and the pixels), as in
test_ops.py.
"""
import os
import subprocess
import sys

# cuBLAS is bitwise reproducible with a fixed workspace configuration; older torch versions insist
# on it under torch.use_deterministic_algorithms(True). Must be set before cuBLAS starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

import odconv  # noqa: E402
from conftest import GRID, STRIDED_LAYOUTS, case_id, make_inputs, strided_variant, tolerances, unpack  # noqa: E402
from odconv.reference import odconv2d_reference  # noqa: E402

NAMES = ("x", "weight", "channel_att", "filter_att", "spatial_att", "kernel_att")
CHUNK_ENV = "ODCONV_CUDA_CHUNK_BYTES"  # the kernels' batch-chunk budget (bytes); small = many chunks

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def ext(inputs, stride, padding, dilation, groups):
    return torch.ops.odconv.odconv2d(*inputs, list(stride), list(padding), list(dilation), groups)


def to(inputs, device=None, dtype=None, requires_grad=True):
    """Fresh leaves with the values of inputs (never aliases them)."""
    return [t.detach().to(device=device, dtype=dtype).clone().requires_grad_(requires_grad) for t in inputs]


def forward_backward(fn, inputs, seed=1):
    """fn(inputs) and the gradients of <fn(inputs), g> for a random g (float64, from seed, then cast)."""
    out = fn(inputs)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, inputs, grad.to(device=out.device, dtype=out.dtype))
    return out, grads


def assert_close_scaled(got, want, dtype, what):
    rtol, atol = tolerances(dtype)
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_matches_reference(inputs, conv, dtype, reference_device="cpu"):
    """Output and the six gradients of the CUDA kernels equal the float64 reference's (computed from the
    same values) to the precision of dtype."""
    stride, padding, dilation, groups = conv
    assert all(t.is_cuda for t in inputs)
    ref_inputs = to(inputs, reference_device, torch.float64)
    out, grads = forward_backward(lambda t: ext(t, *conv), inputs)
    want, want_grads = forward_backward(lambda t: odconv2d_reference(*t, *conv), ref_inputs)
    assert out.dtype == dtype and out.is_cuda and out.shape == want.shape and out.is_contiguous()
    assert_close_scaled(out, want, dtype, "output")
    for name, g, w in zip(NAMES, grads, want_grads):
        assert g.shape == w.shape and g.dtype == dtype and g.is_cuda, name
        assert_close_scaled(g, w, dtype, f"grad {name}")


def case_inputs(case, dtype, device="cuda", seed=0):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float64, seed=seed)
    return to(inputs, device, dtype), (stride, padding, dilation, groups)


# ---- build ------------------------------------------------------------------------------------

def test_cuda_build_registers_cuda_kernels():
    """Runs everywhere: an extension built with CUDA must register the CUDA (and autocast) kernels."""
    build = odconv.backend_info()["build"]
    if not (build.get("built") and build.get("cuda")):
        pytest.skip(f"extension not built with CUDA: {build.get('cuda_skipped_because') or build.get('error')}")
    for op in ("odconv::odconv2d", "odconv::odconv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("odconv::odconv2d", "AutocastCUDA")
    if odconv.backend_info()["requested"] == "auto":
        assert odconv.backend_info()["cuda"]["backend"] == "extension", odconv.backend_info()


def test_cuda_source_emulated_on_cpu():
    """Runs everywhere: benchmarks/cuda_emulate.py compiles csrc/cuda/odconv_cuda.cu as C++ (kernels run
    block by block, threads as cooperative contexts) and checks its output and six gradients against the
    reference on the conftest grid, in many batch chunks and in one, and on layers wider than the thread
    blocks. It catches index, chunking and reduction bugs of the CUDA source on machines without a GPU
    (CI), where the GPU tests below are skipped."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the CUDA tests below run the kernels themselves")
    build = odconv.backend_info()["build"]
    if not build.get("built"):
        pytest.skip(f"no C++ toolchain built the extension: {build.get('error')}")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "cuda_emulate.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.rstrip().endswith("0 failures"), proc.stdout[-4000:]
    assert proc.stdout.count("\nok ") >= 60, proc.stdout[-4000:]


# ---- values and gradients ---------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_reference(case, dtype):
    inputs, conv = case_inputs(case, dtype)
    assert_matches_reference(inputs, conv, dtype)


@requires_cuda
@pytest.mark.parametrize("chunk_bytes", ["1", "3000"], ids=["one_sample_per_chunk", "few_samples_per_chunk"])
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_matches_reference_in_many_chunks(case, chunk_bytes, monkeypatch):
    """The batch split into chunks (partial last chunk, sample sets of the kernels cut by the chunk)."""
    monkeypatch.setenv(CHUNK_ENV, chunk_bytes)
    inputs, conv = case_inputs(case, torch.float64)
    assert_matches_reference(inputs, conv, torch.float64)


@requires_cuda
def test_many_groups_split_over_gemm_batches():
    """Depthwise with 512 groups and 150 samples: more (sample, group) pairs than one batched GEMM takes."""
    inputs, conv = case_inputs((150, 512, 512, 5, 3, 2, 1, 1, 1, 512), torch.float32)
    assert_matches_reference(inputs, conv, torch.float32, reference_device="cuda")


# Layers wider than the kernels' thread blocks: more output channels per group than scale_grad_kernel
# has slices (8), more input columns than its lanes (32), and maps with more pixels than the im2col /
# col2im blocks have threads (256), so every strided loop of those kernels runs several times.
WIDE_CASES = [
    (5, 40, 72, 18, 3, 4, 1, 1, 1, 1),
    (3, 24, 48, 33, 3, 3, 2, 1, 1, 2),
    (2, 16, 40, 20, 5, 2, 1, 2, 1, 4),
]


@requires_cuda
@pytest.mark.parametrize("chunk_bytes", [None, "200000"], ids=["one_chunk", "chunks_of_few_samples"])
@pytest.mark.parametrize("case", WIDE_CASES, ids=case_id)
def test_wide_layers_match_reference(case, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:
        monkeypatch.setenv(CHUNK_ENV, chunk_bytes)
    inputs, conv = case_inputs(case, torch.float64)
    assert_matches_reference(inputs, conv, torch.float64, reference_device="cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
def test_strided_inputs(layout, dtype):
    inputs = strided_variant(case_inputs((3, 6, 8, 7, 3, 3, 1, 1, 1, 2), dtype)[0], layout)
    assert_matches_reference(inputs, ((1, 1), (1, 1), (1, 1), 2), dtype)


@requires_cuda
@pytest.mark.parametrize("case", [GRID[0], GRID[3], GRID[5], GRID[8], GRID[10]], ids=case_id)
def test_gradcheck(case):
    inputs, conv = case_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ext(t, *conv), inputs, eps=1e-6, atol=1e-7)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_cpu_and_cuda_agree(case, dtype):
    """odconv.odconv2d on CPU (the CPU kernels, or the reference without them) and on CUDA."""
    inputs, conv = case_inputs(case, dtype, device="cpu")
    stride, padding, dilation, groups = conv
    fn = lambda t: odconv.odconv2d(*t, stride, padding, dilation, groups)  # noqa: E731
    out_cpu, grads_cpu = forward_backward(fn, inputs, seed=2)
    out_cuda, grads_cuda = forward_backward(fn, to(inputs, "cuda"), seed=2)
    assert out_cuda.is_cuda
    assert_close_scaled(out_cuda, out_cpu, dtype, "output")
    for name, g_cuda, g_cpu in zip(NAMES, grads_cuda, grads_cpu):
        assert_close_scaled(g_cuda, g_cpu, dtype, f"grad {name}")


@requires_cuda
@pytest.mark.parametrize("mask", [(True, False), (False, True), (False, False)], ids=str)
def test_backward_output_mask(mask):
    """Gradients not asked for are zeros of the right shape; the others equal the full backward's."""
    inputs, conv = case_inputs(GRID[4], torch.float64)
    plain = [t.detach() for t in inputs]
    stride, padding, dilation, groups = conv
    out = ext(plain, *conv)
    gy = torch.randn_like(out)
    args = (gy, *plain, list(stride), list(padding), list(dilation), groups)
    full = torch.ops.odconv.odconv2d_backward(*args, [True, True])
    part = torch.ops.odconv.odconv2d_backward(*args, list(mask))
    for i, (name, f, p, t) in enumerate(zip(NAMES, full, part, plain)):
        assert p.shape == t.shape and p.dtype == t.dtype and p.is_cuda, name
        if mask[0 if i == 0 else 1]:
            torch.testing.assert_close(p, f, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        else:
            assert not p.any(), f"{name} was not asked for but is nonzero"


@requires_cuda
def test_direct_call_on_tensors_that_require_grad():
    """The ops called directly (not through autograd) on leaves that require grad: the kernels' internal
    out= GEMMs must not see autograd."""
    inputs, conv = case_inputs(GRID[7], torch.float32)  # 1x1: x is used as the GEMM operand itself
    stride, padding, dilation, groups = conv
    out = ext(inputs, *conv)
    grads = torch.ops.odconv.odconv2d_backward(torch.ones_like(out).detach(), *inputs, list(stride),
                                               list(padding), list(dilation), groups, [True, True])
    assert all(torch.isfinite(g).all() for g in grads)


@requires_cuda
def test_runs_on_current_stream():
    inputs, conv = case_inputs(GRID[3], torch.float32)
    want_out, want_grads = forward_backward(lambda t: ext(t, *conv), inputs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, grads = forward_backward(lambda t: ext(t, *conv), inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(out, want_out) and all(torch.equal(g, w) for g, w in zip(grads, want_grads))


@requires_cuda
def test_device_mismatch_is_an_error():
    inputs, conv = case_inputs(GRID[0], torch.float32)
    inputs[3] = inputs[3].detach().cpu()
    with pytest.raises(RuntimeError, match=r"filter_att must be on the device of x \(cuda:0\), got cpu"):
        ext(inputs, *conv)


# ---- half precision and autocast ----------------------------------------------------------------

LOW_PRECISION_CASES = [
    (4, 16, 32, 12, 3, 4, 1, 1, 1, 1),
    (3, 16, 16, 9, 3, 2, 2, 1, 1, 4),
    (2, 16, 16, 8, 3, 4, 1, 1, 1, 16),  # depthwise
    (4, 32, 16, 7, 1, 4, 1, 0, 1, 1),   # pointwise
]


def relative_error(got, want):
    return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=case_id)
def test_low_precision_error_within_twice_the_reference(case, dtype):
    """In float16/bfloat16 the kernels' error, against the exact (float64) result for the same rounded
    inputs, is at most twice the error of the reference formulation run in that dtype on the GPU."""
    inputs, conv = case_inputs(case, dtype)
    probe = ext([t.detach() for t in inputs], *conv)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(probe.shape, dtype=torch.float64, generator=gen).to(dtype)  # the same g for all three

    def run(fn, leaves):
        out = fn(leaves)
        return out, torch.autograd.grad(out, leaves, grad.to(device=out.device, dtype=out.dtype))

    exact = run(lambda t: odconv2d_reference(*t, *conv), to(inputs, "cpu", torch.float64))
    ours = run(lambda t: ext(t, *conv), to(inputs))
    theirs = run(lambda t: odconv2d_reference(*t, *conv), to(inputs))
    # floor: an eighth of the dtype's epsilon, below the error of merely rounding the result
    floor = torch.finfo(dtype).eps / 8
    for name, o, r, e in zip(("output",) + NAMES, (ours[0],) + ours[1], (theirs[0],) + theirs[1],
                             (exact[0],) + exact[1]):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        err_ours, err_ref = relative_error(o, e), relative_error(r, e)
        assert err_ours <= max(2 * err_ref, floor), f"{name}: error {err_ours:.3g} > 2 x reference's {err_ref:.3g}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_runs_in_autocast_dtype(dtype):
    inputs, conv = case_inputs(GRID[0], torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        out = ext(inputs, *conv)
        # mixed dtypes, as a model under autocast produces them, are cast as well
        mixed = [inputs[0], inputs[1], inputs[2].detach().to(dtype), *inputs[3:]]
        out_mixed = ext(mixed, *conv)
        # float64 is left alone, as by F.conv2d
        out64 = ext(to(inputs, dtype=torch.float64), *conv)
    assert out.dtype == dtype and out_mixed.dtype == dtype and out64.dtype == torch.float64
    assert torch.equal(out, ext([t.detach().to(dtype) for t in inputs], *conv))
    assert torch.equal(out_mixed, out)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_module(dtype):
    torch.manual_seed(0)
    layer = odconv.ODConv2d(8, 16, 3, padding=1).cuda()
    x = torch.randn(4, 8, 10, 10, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


# ---- torch.library / determinism / torch.compile --------------------------------------------

@requires_cuda
@pytest.mark.parametrize("case", [GRID[0], GRID[4], GRID[7]], ids=case_id)
def test_opcheck(case):
    inputs, conv = case_inputs(case, torch.float32)
    stride, padding, dilation, groups = conv
    args = (*inputs, list(stride), list(padding), list(dilation), groups)
    torch.library.opcheck(torch.ops.odconv.odconv2d.default, args)
    plain = [t.detach() for t in inputs]
    out = ext(plain, *conv)
    backward_args = (torch.randn_like(out), *plain, list(stride), list(padding), list(dilation), groups, [True, True])
    torch.library.opcheck(torch.ops.odconv.odconv2d_backward.default, backward_args)


@requires_cuda
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_bitwise_reproducible(deterministic, monkeypatch):
    """No atomics: two runs give bitwise-equal results, with torch.use_deterministic_algorithms (which also
    fills fresh buffers with NaN, so an element the kernels failed to write would show) and without."""
    monkeypatch.setenv(CHUNK_ENV, "40000")  # 2 samples per chunk, 4 chunks: grad_W accumulates over them
    inputs, conv = case_inputs((7, 8, 12, 9, 3, 4, (2, 1), 1, 1, 2), torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = [forward_backward(lambda t: ext(t, *conv), to(inputs), seed=4) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    (out1, grads1), (out2, grads2) = runs
    assert torch.isfinite(out1).all() and all(torch.isfinite(g).all() for g in grads1)
    assert torch.equal(out1, out2)
    for name, g1, g2 in zip(NAMES, grads1, grads2):
        assert torch.equal(g1, g2), f"grad {name} differs between two runs"
    assert_matches_reference(to(inputs), conv, torch.float32)


@requires_cuda
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(odconv.ODConv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                odconv.ODConv2d(8, 8, 3, padding=1, groups=2, kernel_num=2)).cuda()
    compiled = torch.compile(model, fullgraph=True)
    params = list(model.parameters())
    x = torch.randn(5, 4, 9, 9, device="cuda")
    # TF32 off in cuDNN (the attention's 1x1 convolutions): eager and compiled compare at float32 precision
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        want = model(x)
        want_grads = torch.autograd.grad(want.square().sum(), params)
        got = compiled(x)
        got_grads = torch.autograd.grad(got.square().sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
