"""The compiled odconv2d op against the reference: values, gradients, registration, bad input."""
import copy
import inspect
import os
import subprocess
import sys

import pytest
import torch

import odconv
from conftest import (GRID, STRIDED_LAYOUTS, case_id, make_inputs, requires_extension, strided_variant, tolerances,
                      unpack)
from odconv.reference import odconv2d_reference

NAMES = ("x", "weight", "channel_att", "filter_att", "spatial_att", "kernel_att")


def ext(inputs, stride, padding, dilation, groups):
    return torch.ops.odconv.odconv2d(*inputs, list(stride), list(padding), list(dilation), groups)


def assert_matches_reference(inputs, stride, padding, dilation, groups, dtype, ref_inputs=None):
    """Output and all six gradients of the extension equal the float64 reference's, to dtype precision."""
    ref_inputs = ref_inputs or [t.detach().double().requires_grad_() for t in inputs]
    out = ext(inputs, stride, padding, dilation, groups)
    expected = odconv2d_reference(*ref_inputs, stride, padding, dilation, groups)
    rtol, atol = tolerances(dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, inputs, grad.to(dtype), allow_unused=False)
    want = torch.autograd.grad(expected, ref_inputs, grad)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        # gradients are sums over the batch/pixels: scale the absolute tolerance by their magnitude
        scale = max(1.0, w.abs().max().item()) if w.numel() else 1.0
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol * scale, msg=lambda m: f"grad {name}: {m}")



def assert_case_matches_reference(case, dtypes=(torch.float64, torch.float32)):
    """assert_matches_reference on the layer of a GRID-style case, in each dtype."""
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    for dtype in dtypes:
        inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=dtype)
        assert_matches_reference(inputs, stride, padding, dilation, groups, dtype)

@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_extension_matches_reference(case, dtype):
    assert_case_matches_reference(case, (dtype,))


@pytest.fixture
def num_threads():
    """Sets torch's intra-op thread count for the test, restoring it after."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@requires_extension
@pytest.mark.parametrize("threads", [1, 16], ids=["1_thread", "16_threads"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("size", [6, 17], ids=["float32_forward", "16bit_forward"])
@pytest.mark.parametrize("masked", ["auto", "always"])
def test_extension_low_precision(dtype, size, threads, masked, num_threads, monkeypatch):
    # maps of at most 16x16 run the forward through the float32 kernels, larger ones in 16 bit; with
    # 16 threads the 4 samples' output rows are split between threads as well; the 16-bit im2col
    # by masked taps only when forced (on 17x17 auto copies runs)
    monkeypatch.setenv("ODCONV_CPU_MASKED_TAPS", masked)
    num_threads(threads)
    inputs64 = make_inputs(4, 8, 8, size, 3, 4, 1)
    inputs = [t.detach().to(dtype).requires_grad_() for t in inputs64]
    # compare against the reference evaluated on the rounded inputs, in float64
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out = ext(inputs, (1, 1), (1, 1), (1, 1), 1)
    expected = odconv2d_reference(*ref_inputs, (1, 1), (1, 1), (1, 1), 1)
    # output rounding (2^-8 relative for bf16, 2^-11 for fp16) on values of magnitude ~|expected|
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, rtol=2 * eps, atol=1.28 * eps * expected.abs().max().item())
    # the backward (float32 products on the rounded values, gradients rounded to dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(expected, ref_inputs, grad_out.double())
    for name, got, w in zip(("x", "weight", "channel_att", "filter_att", "spatial_att", "kernel_att"), grads, want):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), w, rtol=2 * eps, atol=1.28 * eps * w.abs().max().item(), msg=name)


@requires_extension
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
def test_extension_strided_inputs(layout):
    inputs = strided_variant(make_inputs(3, 6, 8, 7, 3, 3, 2, dtype=torch.float32), layout)
    assert_matches_reference(inputs, (1, 1), (1, 1), (1, 1), 2, torch.float32)


@requires_extension
@pytest.mark.parametrize("case", [GRID[0], GRID[3], GRID[5], GRID[8], GRID[10]], ids=case_id)
def test_gradcheck(case):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups)
    assert torch.autograd.gradcheck(lambda *t: ext(t, stride, padding, dilation, groups), inputs, eps=1e-6, atol=1e-7)


@requires_extension
def test_gradcheck_tiles_cut_in_J():
    # 64 -> 40 channels, 3x3, K = 4 in float64: 28 rows of the K kernels fill a tile, so on a 3x3 map
    # the tiles are 20 rows by a part of J (see make_tiles); fast mode keeps the 92k inputs cheap
    inputs = make_inputs(2, 64, 40, 3, 3, 4, 1)
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (1, 1), (1, 1), 1), inputs, eps=1e-6, atol=1e-7,
                                    fast_mode=True)


@requires_extension
def test_only_requested_gradients_are_computed():
    x, weight, channel, filt, spatial, kern = make_inputs(2, 4, 6, 5, 3, 2, 1)
    x.requires_grad_(False)
    out = ext([x, weight, channel, filt, spatial, kern], (1, 1), (1, 1), (1, 1), 1)
    out.sum().backward()
    assert x.grad is None and weight.grad is not None and kern.grad is not None
    mask_out = torch.ops.odconv.odconv2d_backward(torch.ones_like(out), x, weight, channel, filt, spatial, kern,
                                                  [1, 1], [1, 1], [1, 1], 1, [True, False])
    assert not mask_out[1].any() and mask_out[0].any()


# (the last case: a depthwise layer, csrc/cpu/depthwise_cpu.cpp's kernels)
@requires_extension
@pytest.mark.parametrize("case", [GRID[0], GRID[4], GRID[7], (2, 37, 37, (11, 19), 3, 2, 2, 1, 1, 37)], ids=case_id)
def test_opcheck(case):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float32)
    args = (*inputs, list(stride), list(padding), list(dilation), groups)
    torch.library.opcheck(torch.ops.odconv.odconv2d.default, args)
    out = torch.ops.odconv.odconv2d(*args).detach()
    plain = [t.detach() for t in inputs]
    backward_args = (torch.randn_like(out), *plain, list(stride), list(padding), list(dilation), groups, [True, True])
    torch.library.opcheck(torch.ops.odconv.odconv2d_backward.default, backward_args)


@requires_extension
def test_compile_one_graph_for_all_batch_sizes():
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(odconv.ODConv2d(4, 8, 3, padding=1), torch.nn.ReLU(),
                                odconv.ODConv2d(8, 8, 3, padding=1, groups=2, kernel_num=2))
    compiled_model = copy.deepcopy(eager)
    backend = CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True, dynamic=True)
    backend_calls = []
    for batch in (2, 3, 5, 7):
        x = torch.randn(batch, 4, 6, 6)
        want = eager(x)
        want_grads = torch.autograd.grad(want.square().sum(), list(eager.parameters()))
        got = compiled(x)
        got_grads = torch.autograd.grad(got.square().sum(), list(compiled_model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        backend_calls.append(backend.frame_count)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert backend_calls[0] >= 1 and len(set(backend_calls)) == 1, \
        f"recompiled: backend calls after each batch {backend_calls}"


# ---- bad input: every message names the argument and the expected and received values ----------

def _good():
    return make_inputs(2, 4, 6, 5, 3, 2, 2, dtype=torch.float32, requires_grad=False)


def _bad_cases():
    x, w, ch, f, s, a = _good()
    return {
        "x_ndim": ((x[0], w, ch, f, s, a), {}, ["x", "4-D", "3-D"]),
        "weight_ndim": ((x, w[0], ch, f, s, a), {}, ["weight", "5-D", "4-D"]),
        "channel_mismatch": ((x, w[:, :, :1], ch, f, s, a), {}, ["weight.size(2)", "2", "1"]),
        "groups_not_dividing": ((x, w, ch, f, s, a), {"groups": 3}, ["groups", "3", "Cin = 4"]),
        "channel_att_shape": ((x, w, ch[:, :3], f, s, a), {}, ["channel_att", "(2, 4)", "(2, 3)"]),
        "filter_att_shape": ((x, w, ch, f[:1], s, a), {}, ["filter_att", "(2, 6)", "(1, 6)"]),
        "spatial_att_shape": ((x, w, ch, f, s[:, :2], a), {}, ["spatial_att", "(2, 3, 3)", "(2, 2, 3)"]),
        "kernel_att_shape": ((x, w, ch, f, s, a[:, :1]), {}, ["kernel_att", "(2, 2)", "(2, 1)"]),
        "dtype": ((x, w.double(), ch, f, s, a), {}, ["weight", "torch.float32", "torch.float64"]),
        "att_dtype": ((x, w, ch, f, s.double(), a), {}, ["spatial_att", "float", "double"]),
        "stride_zero": ((x, w, ch, f, s, a), {"stride": 0}, ["stride", ">= 1", "0"]),
        "stride_negative": ((x, w, ch, f, s, a), {"stride": (1, -2)}, ["stride", ">= 1", "-2"]),
        "padding_negative": ((x, w, ch, f, s, a), {"padding": -1}, ["padding", ">= 0", "-1"]),
        "input_too_small": ((x[..., :2, :2], w, ch, f, s, a), {"padding": 0}, ["kernel", "3 x 3", "2 x 2"]),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_input_python_wrapper(name):
    args, kwargs, fragments = _bad_cases()[name]
    kwargs = {"groups": 2, "padding": 1, **kwargs}
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        odconv.odconv2d(*args, **kwargs)
    for fragment in fragments:
        assert fragment.replace("float32", "float").replace("float64", "double") in str(info.value).replace(
            "float32", "float").replace("float64", "double"), (fragment, str(info.value))


@requires_extension
@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_input_compiled_op(name):
    args, kwargs, fragments = _bad_cases()[name]
    kwargs = {"groups": 2, "padding": 1, "stride": 1, **kwargs}
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    with pytest.raises(RuntimeError) as info:
        torch.ops.odconv.odconv2d(*args, pair(kwargs["stride"]), pair(kwargs["padding"]), [1, 1], kwargs["groups"])
    message = str(info.value).replace("float32", "Float").replace("float64", "Double")
    for fragment in fragments:
        fragment = fragment.replace("torch.float32", "Float").replace("torch.float64", "Double")
        fragment = fragment.replace("float", "Float").replace("double", "Double")
        assert fragment in message, (fragment, message)


def test_bad_input_device_mismatch():
    x, w, ch, f, s, a = _good()
    with pytest.raises(ValueError, match=r"filter_att must be on the device of x \(cpu\), got meta"):
        odconv.odconv2d(x, w, ch, f.to("meta"), s, a, padding=1, groups=2)


@requires_extension
def test_backward_rejects_wrong_grad_shape():
    x, w, ch, f, s, a = _good()
    with pytest.raises(RuntimeError,
                       match=r"grad_out must have the output's shape .* = \(2, 6, 5, 5\), got \(2, 6, 4, 5\)"):
        torch.ops.odconv.odconv2d_backward(torch.zeros(2, 6, 4, 5), x, w, ch, f, s, a, [1, 1], [1, 1], [1, 1], 2,
                                           [True, True])


# ---- backend selection ------------------------------------------------------------------------

def _backend_in_subprocess(env_value):
    env = dict(os.environ, ODCONV_BACKEND=env_value)
    code = "import json, odconv; print(json.dumps(odconv.backend_info()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_backend_env_forces_reference():
    info = _backend_in_subprocess("reference")
    assert info["cpu"] == {"backend": "reference", "reason": "ODCONV_BACKEND=reference"}
    assert info["cuda"]["backend"] == "reference"


def test_backend_info_reports_extension_when_required():
    """CI builds with ODCONV_REQUIRE_EXTENSION=1: there the extension must serve the CPU."""
    info = odconv.backend_info()
    assert set(info) >= {"cpu", "cuda", "requested", "build"}
    if os.environ.get("ODCONV_REQUIRE_EXTENSION") == "1":
        assert info["cpu"]["backend"] == "extension", info
    else:
        assert info["cpu"]["backend"] in ("extension", "reference") and info["cpu"]["reason"]


def test_reference_backend_gives_same_result():
    inputs = make_inputs(2, 4, 6, 5, 3, 2, 2, requires_grad=False)
    code = ("import torch, odconv, sys; t = torch.load(sys.argv[1]); "
            "torch.save(odconv.odconv2d(*t, padding=1, groups=2), sys.argv[1])")
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t.pt")
        torch.save(inputs, path)
        subprocess.run([sys.executable, "-c", code, path], env=dict(os.environ, ODCONV_BACKEND="reference"), check=True)
        out_reference = torch.load(path)
    torch.testing.assert_close(out_reference, odconv.odconv2d(*inputs, padding=1, groups=2), rtol=1e-12, atol=1e-12)


# ---- blocking edges of the CPU kernel: several weight tiles, tiles cut in J, several chunks of
# samples, uneven splits, one output channel, batch 1, groups > 1 with tiles of whole groups, K
# without an unrolled aggregation (K = 5). Tile counts are for float64 (float32 tiles hold twice the
# elements, so float32 runs other splits of the same layers). -----------------------------------
BLOCKING = [
    (9, 80, 67, 16, 3, 3, 1, 1, 1, 1),     # 3 tiles of 23 rows gathered in one grad_x panel, 3 chunks
    (1, 80, 67, 16, 3, 3, 1, 1, 1, 1),     # batch 1
    (5, 160, 130, 9, 3, 3, 1, 1, 1, 2),    # one group per tile, 2 tiles
    (7, 96, 1, 8, 3, 5, 2, 1, 1, 1),       # one output channel, K = 5
    (6, 256, 96, 4, 3, 4, 1, 1, 1, 1),     # small map (P = 16): tiles cut in J, 3 x 5 (461 + ... + 460)
    (1, 201, 70, 4, 3, 4, 1, 1, 1, 1),     # cut in J, uneven both ways: rows 24+24+22, J 453+453+453+450
    (2, 128, 200, 12, 3, 4, 1, 1, 1, 1),   # 15 tiles in two grad_x panels (140 + 60 rows); float32 cuts J
    (5, 64, 64, 12, 3, 8, 1, 1, 1, 64),    # depthwise, K = 8
    (4, 192, 160, 6, 1, 4, 1, 0, 1, 1),    # pointwise (im2col-free) with tiles
    (3, 1030, 40, 2, 1, 4, 1, 0, 1, 1),    # pointwise (im2col-free) cut in J: 2 x 3 tiles (344 + 344 + 342)
    (2, 256, 20, 12, 3, 4, 1, 1, 1, 1),    # im2col > 1 MB, < 16 rows per tile: the forward cuts J (20 rows x 5
                                           # blocks of 461/460; float32: 3 x 768), the backward gathers its row
                                           # tiles (7 + 7 + 6; float32 10 + 10) in one grad_x panel
    (5, 32, 8, 64, 3, 2, 1, 1, 1, 1),      # im2col >= 4 MB: the backward takes the grouped-convolution path,
                                           # in chunks of 4 samples' activations (float64; float32: one chunk)
    (3, 40, 24, 10, 3, 4, 1, 1, 1, 1),     # float32: Wb @ cols in brgemm column blocks, P = 100 = 4 x 24 + 4
                                           # (2 x 48 + 4 on CPUs with AVX-512)
    (2, 25, 16, 11, 3, 4, 1, 1, 1, 1),     # P = 121: a last block of 1 column (24s) or 25 (48s); without
                                           # AVX-512 the backward's Q in blocks too, J = 225 = 9 x 24 + 9
    (3, 128, 40, 10, 3, 1, 1, 1, 1, 1),    # K = 1: the forward sizes its tiles as for K = 4, so they are cut in
                                           # J (20 rows x 3 blocks of 384; float32 20 x 2 of 576), where
                                           # the K slices alone would fit all 40 rows by all 1152 columns
    (2, 512, 256, 9, 3, 4, 1, 1, 1, 2),    # a group's Wb (128 x 2304) is over 1 MB: the forward cuts each group
                                           # as a dense layer (32 rows x 5 blocks of 464/448; float32 x 3 of 768)
    (1, 512, 256, 9, 3, 1, 1, 1, 1, 2),    # the same with K = 1 at batch 1 (the rows split between threads)
    (3, 512, 256, 4, 3, 4, 1, 1, 1, 2),    # the same on a 4x4 map: the folded float32 forward's tiles cut groups too
    (2, 216, 136, 14, 5, 4, 1, 2, 1, 1),   # im2col of 4.2 MB a sample (float32; 8.5 float64): the forward's tiles
                                           # cut in J take up to 128 rows (136 = 2 x 68) by 256 columns
]


@requires_extension
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", BLOCKING, ids=case_id)
def test_blocking_edges_match_reference(case, dtype):
    assert_case_matches_reference(case, (dtype,))


@requires_extension
@pytest.mark.parametrize("case", [BLOCKING[0], BLOCKING[2], BLOCKING[3], BLOCKING[5], BLOCKING[8]], ids=case_id)
def test_one_gradient_group_equals_the_full_backward(case):
    # With both groups the backward builds Wb for grad_x inside the parameter-gradient reduction; with
    # grad_x alone it aggregates Wb separately, and with the parameters alone it builds no Wb at all.
    assert_gradient_groups_agree(case, tol=1e-12)


@requires_extension
@pytest.mark.parametrize("case", [
    (5, 64, 64, 12, 3, 8, 1, 1, 1, 64),    # depthwise: one chunk, whose convolution's grad_x is the op's
    (5, 64, 64, 64, 3, 2, 1, 1, 1, 64),    # depthwise on 64x64: chunks of 2 samples, grad_x copied from each
    (1, 12, 8, 9, 3, 4, 2, 1, 1, 1),       # dense, batch 1 (ODCONV_CPU_CONV_PATH=always): one chunk
], ids=case_id)
def test_one_gradient_group_equals_the_full_backward_on_convolution_chunks(case, monkeypatch):
    # grad_x alone, parameters alone (grad_x then zeros, not the convolution's) and both
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", "always")
    assert_gradient_groups_agree(case, tol=1e-12, check_reference=True)


def assert_gradient_groups_agree(case, tol, check_reference=False):
    """In float64, the backward op's grad_x alone and parameter gradients alone equal those of the full backward
    (within tol), and with check_reference the full backward equals the reference's gradients."""
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = [t.detach() for t in make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float64)]
    conv = (list(stride), list(padding), list(dilation), groups)
    out = torch.ops.odconv.odconv2d(*inputs, *conv)
    grad_out = torch.randn_like(out)
    both = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, True])
    if check_reference:
        ref = [t.detach().requires_grad_() for t in inputs]
        want = torch.autograd.grad(odconv2d_reference(*ref, *conv), ref, grad_out)
        for name, got, expected in zip(NAMES, both, want):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    x_only = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, False])
    params_only = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [False, True])
    torch.testing.assert_close(x_only[0], both[0], rtol=tol, atol=tol)
    for name, alone, full in zip(NAMES[1:], params_only[1:], both[1:]):
        torch.testing.assert_close(alone, full, rtol=tol, atol=tol, msg=lambda m: f"grad {name}: {m}")
    # a gradient not asked for comes back as zeros (the schema's contract)
    assert not params_only[0].any(), "grad x not asked for, not zeros"
    for name, grad in zip(NAMES[1:], x_only[1:]):
        assert not grad.any(), f"grad {name} not asked for, not zeros"


# ---- the two CPU algorithms: per-sample GEMMs (im2col) and the grouped convolution on chunks of samples
# (chosen for depthwise-like layers). ODCONV_CPU_CONV_PATH forces one, so both run on every layer kind.
CONV_PATH_CASES = [case for case in GRID if unpack(case)[-1] > 1 and unpack(case)[0] > 0] + [
    (5, 64, 64, 12, 3, 8, 1, 1, 1, 64),    # depthwise, K = 8
    (3, 12, 8, 9, 3, 4, 2, 1, 1, 1),       # dense: the grouped-convolution path with groups = n
    (1, 12, 8, 9, 3, 4, 2, 1, 1, 1),       # dense, batch 1: one chunk, whose convolution output is the op's
    (5, 64, 64, 64, 3, 2, 1, 1, 1, 64),    # depthwise on 64x64: chunks of 2 (float64) or 4 samples, the last short
                                           # (the float32 forward, 5.2 MB of activations: one chunk)
    (0, 8, 8, 6, 3, 4, 1, 1, 1, 8),        # batch 0
]


@requires_extension
@pytest.mark.parametrize("path", ["always", "never"])
@pytest.mark.parametrize("case", CONV_PATH_CASES, ids=case_id)
def test_both_cpu_algorithms_match_reference(case, path, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", path)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.parametrize("path", ["always", "never"])
def test_both_cpu_algorithms_gradcheck(path, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", path)
    inputs = make_inputs(2, 4, 8, 5, 3, 3, 4)  # depthwise with channel multiplier 2
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (1, 1), (1, 1), 4), inputs, eps=1e-6, atol=1e-7)


@requires_extension
def test_bad_cpu_algorithm_names_the_variable(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", "fast")
    with pytest.raises(RuntimeError, match="ODCONV_CPU_CONV_PATH.*auto, always or never.*'fast'"):
        ext(make_inputs(2, 4, 8, 5, 3, 2, 4), (1, 1), (1, 1), (1, 1), 4)  # depthwise with a multiplier of 2


# ---- the float32 forward of layers on maps of at least 256 output pixels runs the convolution primitive on each
# thread's run of samples, c samples per call (about 32 M multiply-adds; with fewer than 8 input channels per group
# one per call, and only when a sample's im2col matrix reaches 1.5 MB; 1x1 kernels without im2col with 512 input
# channels or more on maps of 144-1024 pixels). Runs end with a shorter call; 3 threads give uneven runs. ------------
SAMPLE_CONVOLUTIONS = [
    (5, 64, 8, 32, 3, 2, 1, 1, 1, 1),      # several samples per call
    (3, 48, 8, 64, 3, 2, 2, 1, 1, 1),      # stride 2
    (4, 48, 16, 32, 3, 3, 1, 1, 1, 2),     # two groups
    (1, 64, 8, 32, 3, 2, 1, 1, 1, 1),      # batch 1: one convolution call spread over the threads
    (3, 3, 4, 128, 3, 2, 1, 1, 1, 1),      # 3 input channels, im2col 1.7 MB: one sample per call
    (9, 16, 16, 32, 3, 2, 1, 1, 1, 1),     # small layer: up to 9 samples per call
    (3, 520, 24, 12, 1, 3, 1, 0, 1, 1),    # 1x1 without im2col, 512+ input channels on 144-1024 pixels
]


@requires_extension
def test_forward_by_sample_convolutions_under_inference_mode(num_threads):
    # its convolutions run on worker threads, which must see the caller's inference mode (odconv.predict)
    num_threads(2)
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(SAMPLE_CONVOLUTIONS[0])
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float32)
    conv = (stride, padding, dilation, groups)
    want = ext(inputs, *conv).detach()
    with torch.inference_mode():
        got = ext([t.detach() for t in inputs], *conv)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the float32 backward of dense layers on maps of at least 256 output pixels runs convolution_backward on
# each thread's run of samples, c samples per call (about 32 M multiply-adds; one at a time below 8 input channels
# per group), and reduces each sample's kernel gradient at once; runs after the first keep a share of grad_W, which
# the cases keep below a quarter of the activations (else the chunks run). ----------------------------------------
SAMPLE_CONVOLUTION_BACKWARDS = [
    (4, 128, 8, 16, 3, 2, 1, 1, 1, 1),     # oneDNN's backward-weights kernel (it ran a wrong work split here)
    (7, 16, 16, 32, 3, 3, 1, 1, 1, 1),     # several samples per call; 3 threads: uneven runs
    (4, 3, 16, 32, 3, 4, 1, 1, 1, 1),      # 3 input channels: one sample per call
    (5, 32, 16, 32, 3, 2, 1, 1, 1, 2),     # two groups
    (3, 48, 8, 64, 3, 2, 2, 1, 1, 1),      # stride 2; 3 threads: one sample per run
    (6, 16, 1, 20, 3, 3, 1, 1, 1, 1),      # one output channel, 20x20 map (400 pixels)
]

# ---- float32 grouped layers of narrow groups (at most 32 output channels per group, widths multiples of 8) run
# both directions through grouped convolutions on maps of any size: the backward at stride 1 (on AVX-512 not with
# 16+ rows per group on maps of at most 4.5 pixels per row of a group: those split the GEMM path by columns), the
# forward with 16+ groups or 5x5+ kernels, at most 24 rows per group (32 on AVX-512 on maps of 196+ pixels), 1 M
# multiply-adds per sample and a sample per thread. ------
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
# The kernels' AVX-512 code runs only where the extension was compiled with it too (a build for older CPUs,
# ODCONV_CPU_ARCH="-march=x86-64-v3", run on this CPU has none); the path rules read the CPU alone (AVX512).
AVX512_CODE = AVX512 and "avx512f" in (odconv.backend_info()["build"].get("required_cpu_features") or [])
NARROW_GROUP_PATHS = {  # case: (forward, backward) path that auto takes
    (4, 512, 512, 7, 3, 2, 1, 1, 1, 16): ("never", "never" if AVX512 else "always"),  # 32 rows, 49 pixels
    (4, 512, 512, 14, 3, 2, 1, 1, 1, 16): ("always" if AVX512 else "never", "always"),  # 32 rows, 196 pixels
    (4, 128, 128, 8, 3, 2, 1, 1, 1, 8): ("never", "never" if AVX512 else "always"),  # 16 rows, 64 pixels
    (4, 128, 128, 9, 3, 2, 1, 1, 1, 8): ("never", "always"),     # 16 rows, 81 pixels
    (4, 128, 128, 14, 3, 2, 1, 1, 1, 16): ("always", "always"),  # 16 groups of 8 channels
    (5, 64, 64, 9, 5, 3, 1, 2, 1, 8): ("always", "always"),      # 5x5 kernels, 8 groups; 3 threads: uneven runs
    (6, 64, 64, 7, 3, 2, 1, 1, 1, 8): ("never", "always"),       # 7x7 map: 0.2 M multiply-adds per sample
    (4, 256, 256, 12, 3, 2, 2, 1, 1, 16): ("always", "never"),   # stride 2, 12x12 -> 6x6
    (4, 96, 96, 8, 3, 2, 1, 1, 1, 8): ("never", "never"),        # groups of 12 channels
}
NARROW_GROUPS = list(NARROW_GROUP_PATHS)


@requires_extension
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("case", SAMPLE_CONVOLUTIONS + SAMPLE_CONVOLUTION_BACKWARDS + NARROW_GROUPS, ids=case_id)
def test_sample_convolutions_match_reference(case, threads, num_threads):
    # output and all six gradients; most cases run per-sample convolutions in both directions
    num_threads(threads)
    assert_case_matches_reference(case, (torch.float32,))


def float32_layer(case):
    """The detached float32 inputs (x, weight, four attentions) of a GRID-style case, its conv arguments
    (stride, padding, dilation, groups) and a random grad_out of its output's shape."""
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = [t.detach() for t in make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float32)]
    conv = (list(stride), list(padding), list(dilation), groups)
    grad_out = torch.randn_like(torch.ops.odconv.odconv2d(*inputs, *conv))
    return inputs, conv, grad_out


def assert_auto_takes(case, variable, wants, monkeypatch, values=("always", "never")):
    """The float32 forward (wants[0], unless None) and, if named, backward (wants[1]) of a GRID-style case with
    `variable` at auto are bit for bit those with it at the wanted value (one of the two `values`), and not those
    with the other."""
    inputs, conv, grad_out = float32_layer(case)
    results = {}
    for mode in ("auto", *values):
        monkeypatch.setenv(variable, mode)
        results[mode] = ([torch.ops.odconv.odconv2d(*inputs, *conv)],
                         torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, True]))
    for direction, want in enumerate(wants):
        if want is None:
            continue
        other = values[1] if want == values[0] else values[0]
        assert all(torch.equal(g, e) for g, e in zip(results["auto"][direction], results[want][direction]))
        assert not all(torch.equal(g, e) for g, e in zip(results["auto"][direction], results[other][direction]))


@requires_extension
@pytest.mark.parametrize("case", NARROW_GROUPS, ids=case_id)
def test_narrow_groups_take_the_convolution_path(case, monkeypatch, num_threads):
    # each direction takes the path named in NARROW_GROUP_PATHS
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_CONV_PATH", NARROW_GROUP_PATHS[case], monkeypatch)


# Dense layers on 16x16 maps: the forward takes the convolution path; the backward too without AVX-512, on
# AVX-512 it stays on the GEMM path (from 17x17 on it takes the convolution path there too).
@requires_extension
@pytest.mark.parametrize("case,wants", [((4, 32, 32, 16, 3, 2, 1, 1, 1, 1),
                                         ("always", "never" if AVX512 else "always")),
                                        ((4, 32, 32, 18, 3, 2, 1, 1, 1, 1), ("always", "always"))],
                         ids=["16x16", "18x18"])
def test_dense_backward_path_by_map_size(case, wants, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_CONV_PATH", wants, monkeypatch)


# Layers on 10x10 maps with 5 MB of im2col a sample (7x7 kernels, 256 channels): the forward takes the convolution
# path with at most 64 output channels per group; the backward (a map under the pixel rule's) with 100 pixels for
# at least 6 rows of a group: 8 rows, 16, two groups of 12, not 24 (forward only) or 72 (neither).
@requires_extension
@pytest.mark.parametrize("case,wants", [((2, 256, 8, 10, 7, 2, 1, 3, 1, 1), ("always", "always")),
                                        ((2, 256, 16, 10, 7, 2, 1, 3, 1, 1), ("always", "always")),
                                        ((2, 256, 24, 10, 7, 2, 1, 3, 1, 2), ("always", "always")),
                                        ((2, 256, 24, 10, 7, 2, 1, 3, 1, 1), ("always", "never")),
                                        ((2, 256, 72, 10, 7, 2, 1, 3, 1, 1), ("never", "never"))],
                         ids=["8_rows", "16_rows", "2_groups_of_12_rows", "24_rows", "72_rows"])
def test_large_im2col_path_by_rows(case, wants, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_CONV_PATH", wants, monkeypatch)


# Dense layers of 3 output channels stay on the GEMM path on an 18x18 map (8 channels take the convolution path
# there). The backward shows it: on this layer the two forwards compute the same bits. With a sample's im2col
# matrix of 12 MiB or more (64 channels, 7x7 kernel, 32x32 map: 12.3 MB) the forward takes the convolution
# path, and from 48 MiB (128 channels on 45x45: 50.8 MB) the backward too.
@requires_extension
@pytest.mark.parametrize("case,wants", [((4, 32, 3, 18, 3, 2, 1, 1, 1, 1), (None, "never")),
                                        ((4, 32, 8, 18, 3, 2, 1, 1, 1, 1), ("always", "always")),
                                        ((2, 64, 3, 32, 7, 2, 1, 3, 1, 1), ("always", "never")),
                                        ((2, 128, 3, 45, 7, 2, 1, 3, 1, 1), ("always", "always"))],
                         ids=["3_rows", "8_rows", "3_rows_12MB_im2col", "3_rows_50MB_im2col"])
def test_few_output_channels_path(case, wants, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_CONV_PATH", wants, monkeypatch)


# A 1x1 kernel without stride or padding has no im2col matrix: 4.5 MB of x a sample does not send its backward to
# the convolution path (a 3x3 kernel's 4.1 MB of im2col does)
@requires_extension
@pytest.mark.parametrize("case,wants", [((2, 1024, 32, 33, 1, 2, 1, 0, 1, 1), ("never", "never")),
                                        ((2, 112, 32, 33, 3, 2, 1, 1, 1, 1), (None, "always"))],
                         ids=["1x1", "3x3"])
def test_backward_path_of_identity_im2col(case, wants, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_CONV_PATH", wants, monkeypatch)


@requires_extension
@pytest.mark.parametrize("case", SAMPLE_CONVOLUTION_BACKWARDS[1:4], ids=case_id)
def test_backward_by_sample_convolutions_gradient_groups(case, monkeypatch):
    # float64 takes the path only when forced; grad_x alone and the parameter gradients alone give the same values
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", "always")
    assert_gradient_groups_agree(case, tol=0, check_reference=True)


@requires_extension
def test_backward_by_sample_convolutions_gradcheck(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", "always")
    inputs = make_inputs(2, 4, 4, 10, 3, 2, 1)
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (1, 1), (1, 1), 1), inputs, eps=1e-6, atol=1e-7)


@requires_extension
def test_backward_by_sample_convolutions_on_fresh_threads():
    # A thread's first ATen call sets its OpenMP thread count to torch's; the workers must make that happen before
    # they lower it to one for oneDNN (else its backward-weights kernel, created for 3 threads and run by one, left
    # part of grad_W unwritten). Only a fresh process has threads that ATen has not seen yet.
    code = """
import os, torch, odconv
torch.set_num_threads(3)
torch.manual_seed(0)
x = torch.randn(3, 48, 64, 64); w = torch.randn(2, 8, 48, 3, 3) * 0.05
ch, f, s = torch.rand(3, 48), torch.rand(3, 8), torch.rand(3, 3, 3)
a = torch.softmax(torch.randn(3, 2), 1)
grad_out = torch.randn(3, 8, 32, 32)
conv = ([2, 2], [1, 1], [1, 1], 1)
got = torch.ops.odconv.odconv2d_backward(grad_out, x, w, ch, f, s, a, *conv, [True, True])
os.environ["ODCONV_CPU_CONV_PATH"] = "never"
want = torch.ops.odconv.odconv2d_backward(grad_out, x, w, ch, f, s, a, *conv, [True, True])
for name, g, e in zip("x weight channel_att filter_att spatial_att kernel_att".split(), got, want):
    err = ((g - e).abs().max() / e.abs().max()).item()
    assert err < 1e-5, (name, err)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ODCONV_CPU_CONV_PATH": "auto"})
    assert result.returncode == 0, result.stderr[-2000:]


# ---- the float32 forward multiplies out^T = im2row @ Wb^T when P = Ho*Wo is just above a multiple of 16
# (brgemm runs a ragged block of columns slowly): 6x6 and 7x7 maps, with groups, 1x1 without im2col,
# tiles cut in J, several chunks. -------------------------------------------------------------------
TRANSPOSED_FORWARD = [
    (5, 24, 40, 6, 3, 4, 1, 1, 1, 1),      # P = 36
    (3, 16, 24, 7, 3, 3, 1, 1, 1, 2),      # P = 49, two groups
    (4, 40, 24, 6, 1, 2, 1, 0, 1, 1),      # 1x1 without im2col: im2row is x transposed
    (3, 150, 40, 6, 3, 4, 1, 1, 1, 1),     # J = 1350: tiles cut in J accumulate out^T
    (70, 16, 8, 5, 3, 2, 1, 1, 1, 1),      # P = 25, several chunks of samples
    # Runs of at least 5 samples transpose W's slices once per run and build A^T from them, four
    # samples per pass, the scales folded onto im2row and the output: K with and without an unrolled
    # loop, rows not a multiple of the vector width, groups, tiles cut in J, 1x1 without im2col, a
    # batch split into runs of 5 and 6 (or one of 11), tiles of whole groups larger than a pass's
    # budget.
    (12, 24, 40, 6, 3, 4, 1, 1, 1, 1),     # K = 4, 40 rows
    (12, 16, 24, 7, 3, 5, 1, 1, 1, 2),     # K = 5, two groups
    (12, 150, 40, 6, 3, 8, 1, 1, 1, 1),    # K = 8, tiles of 32 + 8 rows cut in J
    (12, 40, 24, 6, 1, 1, 1, 0, 1, 1),     # K = 1, 1x1
    (11, 20, 9, 7, 3, 3, 1, 1, 1, 1),      # K = 3, 9 rows
    (10, 256, 128, 6, 3, 4, 1, 1, 1, 2),   # two groups of 64 x 1152: 2.4 MB passes
    # The tiles' rows are the products' columns: ranges of rows in multiples of 16 but for the last
    # (1x1 160->200 on 7x7: 112 + 88 rows, even cuts would make 100 + 100; 24->150 3x3: 80 + 70).
    (12, 160, 200, 7, 1, 4, 1, 0, 1, 1),
    (3, 24, 150, 7, 3, 4, 1, 1, 1, 1),
    # 1x1 without im2col on 7x7 with tiles cut in J: ranges of 64 rows (64 + 36) by blocks of up to 512 columns
    (12, 1100, 100, 7, 1, 4, 1, 0, 1, 1),
    # Tap-major products skip the padded kernel rows of the first and last output rows, class by
    # class: stride 2 (two classes), dilation 2 (three classes of two, three and two rows), padding 0
    # (one class: one product), padding 3 (the first and last rows' classes have no kernel row inside
    # the map: their rows of out^T are zeros), and tiles cut in J (whole channels, tap-major within
    # each: 400 channels in five blocks of 80; the 150-channel cases above 64, 64, 22).
    (4, 16, 24, 12, 3, 4, 2, 1, 1, 1),
    (3, 16, 24, 7, 3, 4, 1, 2, 2, 1),
    (3, 16, 24, 8, 3, 4, 1, 0, 1, 1),
    (3, 16, 24, 5, 3, 4, 1, 3, 1, 1),
    (3, 400, 40, 6, 3, 4, 1, 1, 1, 1),
    (12, 400, 40, 6, 3, 4, 1, 1, 1, 1),
    # Column-block runs (dense layers whose tiles are cut in J, tap-major per run, the batch split): the rows
    # of one block of channels at a time from x channels-last, every tile of the block over the run's samples;
    # 4 and 1 samples per thread above build each sample's Wb^T, 6 here fold A^T (150 channels: blocks of 64,
    # 64 and 22 for 32 + 8 rows; 200 channels with 5x5 kernels and stride 2: six blocks of 32 and one of 8)
    (18, 150, 40, 6, 3, 4, 1, 1, 1, 1),
    (18, 200, 24, 7, 5, 4, 2, 2, 1, 1),
]


@requires_extension
@pytest.mark.parametrize("split", ["samples", "tiles"])
@pytest.mark.parametrize("tap_major", ["always", "runs", "never"])
@pytest.mark.parametrize("case", TRANSPOSED_FORWARD, ids=case_id)
def test_transposed_forward_matches_reference(case, tap_major, split, monkeypatch, num_threads):
    # (the transposed product forced: on AVX-512 grouped layers keep the plain one by default)
    # with the columns in (tap, channel) order (im2row by channels-last copies, W permuted and transposed once per
    # call, "always": the default below 16 MB of W; or each tile's slices permuted as a run transposes them,
    # "runs") and in im2col's order ("never"); the batch split between the
    # threads, or the ranges of tile rows split between them for every sample of a chunk (W's slices
    # transposed once per chunk, A^T folded; the default for batches under 5 samples per thread): at
    # 3 threads the cases' 1-2 ranges leave threads idle, 70 samples go in two chunks of 35, and the
    # smaller batches fold in one chunk (3 and 4 samples too)
    monkeypatch.setenv("ODCONV_CPU_TRANSPOSED_FORWARD", "always")
    monkeypatch.setenv("ODCONV_CPU_TAP_MAJOR", tap_major)
    monkeypatch.setenv("ODCONV_CPU_FORWARD_SPLIT", split)
    num_threads(3)
    assert_case_matches_reference(case, (torch.float32,))


# ODCONV_CPU_TRANSPOSED_FORWARD forces the product's orientation against the map's choice: the
# transposed product on maps the default multiplies Wb @ cols (P a multiple of 16 or nearly: 8x8,
# 10x10, 12x12 1x1 without im2col, stride 2 onto 8x8, four groups), the plain one on maps the
# default transposes (6x6 and 7x7, with groups, tiles cut in J).
FORCED_ORIENTATION = [
    ("always", (6, 16, 24, 8, 3, 4, 1, 1, 1, 1)),
    ("always", (3, 24, 40, 10, 3, 3, 1, 1, 1, 1)),
    ("always", (5, 20, 12, 12, 1, 2, 1, 0, 1, 1)),
    ("always", (3, 16, 24, 16, 3, 4, 2, 1, 1, 1)),
    ("always", (6, 16, 16, 10, 3, 4, 1, 1, 1, 4)),
    ("never", (5, 24, 40, 6, 3, 4, 1, 1, 1, 1)),
    ("never", (3, 16, 24, 7, 3, 3, 1, 1, 1, 2)),
    ("never", (12, 150, 40, 6, 3, 8, 1, 1, 1, 1)),
]


@requires_extension
@pytest.mark.parametrize("mode,case", FORCED_ORIENTATION, ids=lambda v: v if isinstance(v, str) else case_id(v))
def test_forced_forward_orientation_matches_reference(mode, case, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_TRANSPOSED_FORWARD", mode)
    assert_case_matches_reference(case, (torch.float32,))


# Tap-major columns where the rules keep no permuted copy of W (W larger than the output): with runs of at
# least 5 samples per thread, or with the threads sharing the tiles (fewer samples, ranges of rows that 2
# threads share evenly: 40 rows in 2), which transpose W's slices anyway, each tile's slices are permuted as
# they are transposed ("runs"); runs of fewer samples (80 rows in 3 ranges) keep im2col's order.
@requires_extension
@pytest.mark.parametrize("case,want", [((12, 150, 40, 6, 3, 4, 1, 1, 1, 1), "runs"),
                                       ((6, 150, 40, 6, 3, 4, 1, 1, 1, 1), "runs"),
                                       ((6, 150, 80, 6, 3, 4, 1, 1, 1, 1), "never")],
                         ids=["6_per_thread", "3_per_thread_tiles_shared", "3_per_thread"])
def test_tap_major_columns_per_run(case, want, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_TAP_MAJOR", (want, None), monkeypatch, values=("runs", "never"))


# On 7x7 maps grouped layers of at most 8 rows per group keep the plain product (the transposed one would have
# fewer columns than a vector); without AVX-512 12 rows and more transpose it, on AVX-512 (brgemm blocks of 16
# columns) grouped layers keep the plain product at any width.
@requires_extension
@pytest.mark.parametrize("case,want", [((4, 64, 64, 7, 3, 2, 1, 1, 1, 16), "never"),
                                       ((4, 96, 96, 7, 3, 2, 1, 1, 1, 8), "never" if AVX512 else "always")],
                         ids=["4_rows", "12_rows"])
def test_orientation_of_grouped_forwards(case, want, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_TRANSPOSED_FORWARD", (want,), monkeypatch)


# K = 1: one kernel shared by the batch, the samples' scaled im2col matrices side by side in one product
# (forward_shared_kernel). Cases: several runs of samples per thread (70 samples, runs of at most 32 on
# 4x4), blocks of 32 rows and 1024 columns of W (40 rows, J = 1152), groups, stride, dilation and
# padding, a 1x1 kernel, batch 1 (always), a 3x3 map.
SHARED_KERNEL = [
    (70, 8, 6, 4, 3, 1, 1, 1, 1, 1),
    (4, 128, 40, 4, 3, 1, 1, 1, 1, 1),
    (3, 12, 9, 7, 3, 1, 2, 1, 1, 3),
    (4, 6, 4, 10, 5, 1, 1, 4, 2, 2),
    (3, 24, 10, 5, 1, 1, 1, 0, 1, 1),
    (1, 16, 8, 6, 3, 1, 1, 1, 1, 1),
    (5, 16, 8, 3, 3, 1, 1, 1, 1, 1),
]


@requires_extension
@pytest.mark.parametrize("path", ["always", "never"])
@pytest.mark.parametrize("case", SHARED_KERNEL, ids=case_id)
def test_shared_kernel_forward_matches_reference(case, path, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_SHARED_KERNEL", path)
    assert_case_matches_reference(case)


# auto takes it with K = 1 on maps of at most 49 pixels (a batch of at least the thread count), not on
# 10x10 (nor on 8x8, whose folded per-sample build computes the same bits here: a = 1 with one kernel)
@requires_extension
@pytest.mark.parametrize("case,want", [((4, 16, 8, 7, 3, 1, 1, 1, 1, 1), "always"),
                                       ((4, 16, 8, 10, 3, 1, 1, 1, 1, 1), "never")], ids=["7x7", "10x10"])
def test_shared_kernel_forward_by_map_size(case, want, monkeypatch, num_threads):
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_SHARED_KERNEL", (want, None), monkeypatch)


@requires_extension
def test_shared_kernel_override_is_checked(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_SHARED_KERNEL", "yes")
    x, w, ch, f, s, a = make_inputs(2, 8, 8, 6, 3, 1, 1, dtype=torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_SHARED_KERNEL.*auto, always or never.*'yes'"):
        torch.ops.odconv.odconv2d(x, w, ch, f, s, a, [1, 1], [1, 1], [1, 1], 1)


@requires_extension
@pytest.mark.parametrize("variable,value,choices", [("ODCONV_CPU_TRANSPOSED_FORWARD", "yes", "auto, always or never"),
                                                    ("ODCONV_CPU_TAP_MAJOR", "sometimes",
                                                     "auto, always, runs or never"),
                                                    ("ODCONV_CPU_FORWARD_SPLIT", "rows", "auto, samples or tiles"),
                                                    ("ODCONV_CPU_MASKED_TAPS", "maybe", "auto, always or never"),
                                                    ("ODCONV_CPU_SKIP_PADDED_ROWS", "always", "auto or never")])
def test_forward_path_overrides_are_checked(variable, value, choices, monkeypatch, num_threads):
    monkeypatch.setenv(variable, value)
    num_threads(1)  # a batch smaller than the thread count splits rows and never asks for the tap-major columns
    x, w, ch, f, s, a = make_inputs(2, 8, 8, 6, 3, 2, 1, dtype=torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match=f"{variable}.*{choices}.*'{value}'"):
        torch.ops.odconv.odconv2d(x, w, ch, f, s, a, [1, 1], [1, 1], [1, 1], 1)


# ---- Kernel rows and columns that read only padding are dropped (DeadTaps in csrc/cpu/odconv_cpu.cpp):
# a 3x3 kernel on 1x1 maps (its centre), 7x7 on 3x3 (its middle 5x5), a dilation beyond the map, dead rows
# only (1x5 maps), stride 2 with groups (5x5 on 2x2), a 1x7 kernel, and a dead pair of rows with live
# columns under a rectangular dilation. -------------------------------------------------------------------
# Batches large enough that the trim pays (dead_taps: B * (1 + P/K) * dead fraction >= 16).
DEAD_TAPS = [
    (16, 8, 6, 1, 3, 2, 1, 1, 1, 1),
    (8, 6, 4, 3, 7, 2, 1, 3, 1, 1),
    (2, 4, 6, 5, 3, 2, 1, 6, 6, 1),
    (8, 4, 6, (1, 5), 3, 2, 1, 1, 1, 1),
    (20, 4, 4, 2, 5, 3, 2, 2, 1, 2),
    (8, 4, 6, (3, 2), (1, 7), 2, 1, (0, 3), 1, 1),
    (2, 6, 4, (4, 9), 3, 3, 1, (5, 2), (5, 2), 1),
]
# (live rows at each end trimmed, live columns): the layers of DEAD_TAPS without their dead taps
DEAD_TAPS_TRIMMED = [(1, 1), (1, 1), (1, 1), (1, 0), (1, 1), (0, 2), (1, 0)]


@requires_extension
@pytest.mark.parametrize("path", ["auto", "never"])
@pytest.mark.parametrize("case", DEAD_TAPS, ids=case_id)
def test_dead_taps_match_reference(case, path, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_DEAD_TAPS", path)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dead_taps_16_bit(dtype):
    assert_case_matches_reference(DEAD_TAPS[1], (dtype,))


@requires_extension
def test_dead_taps_gradcheck():
    inputs = make_inputs(9, 3, 4, 2, 5, 2, 1)  # 5x5 on 2x2: its middle 3x3 (9 samples: the trim pays)
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (2, 2), (1, 1), 1), inputs, eps=1e-6, atol=1e-7)


@requires_extension
@pytest.mark.parametrize("case,trim", list(zip(DEAD_TAPS, DEAD_TAPS_TRIMMED)), ids=[case_id(c) for c in DEAD_TAPS])
def test_dead_taps_are_those_no_pixel_reads(case, trim, monkeypatch):
    """The layer with dead taps gives bit for bit the output and gradients of the same layer with the trimmed
    kernel (weight and spatial_att without the dead rows and columns, padding less by as many dilations), zeros
    in the dead taps' gradients."""
    monkeypatch.setenv("ODCONV_CPU_DEAD_TAPS", "auto")
    inputs, (stride, padding, dilation, groups), grad_out = float32_layer(case)
    rows, cols = trim
    x, weight, ch, f, s, a = inputs
    kh, kw = weight.shape[-2:]
    live = lambda t: t[..., rows:kh - rows, cols:kw - cols].contiguous()  # noqa: E731
    live_padding = [padding[0] - rows * dilation[0], padding[1] - cols * dilation[1]]
    trimmed = [x, live(weight), ch, f, live(s), a]
    out = torch.ops.odconv.odconv2d(*inputs, stride, padding, dilation, groups)
    assert torch.equal(out, torch.ops.odconv.odconv2d(*trimmed, stride, live_padding, dilation, groups))
    grads = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, stride, padding, dilation, groups, [True, True])
    want = torch.ops.odconv.odconv2d_backward(grad_out, *trimmed, stride, live_padding, dilation, groups,
                                              [True, True])
    for i, (got, expected) in enumerate(zip(grads, want)):
        if i in (1, 4):  # weight, spatial_att: the trimmed layer's in the live taps, zeros in the dead ones
            assert got.shape == inputs[i].shape
            assert torch.equal(live(got), expected)
            got = got.clone()
            got[..., rows:kh - rows, cols:kw - cols] = 0
            assert not got.any()
        else:
            assert torch.equal(got, expected)
    # and the full kernel's products round differently somewhere: auto did trim
    monkeypatch.setenv("ODCONV_CPU_DEAD_TAPS", "never")
    untrimmed = [torch.ops.odconv.odconv2d(*inputs, stride, padding, dilation, groups),
                 *torch.ops.odconv.odconv2d_backward(grad_out, *inputs, stride, padding, dilation, groups, [True, True])]
    assert not all(torch.equal(a, b) for a, b in zip([out, *grads], untrimmed))


# Kept whole: every tap read by some pixel (5x5 on 3x3), a dead row at one end only (3x3 on 2x2 with stride 2),
# a dead pair of rows the padding does not cover (3x3 with dilation 3 and padding 2 on 4x4 maps: only the
# centre row reads the map, but trimming a row would take the padding below zero), and a batch too small to
# pay for the trim (DEAD_TAPS[0] with 2 samples: 2 * 1.5 * 8/9 < 16)
@requires_extension
@pytest.mark.parametrize("case", [(32, 4, 4, 3, 5, 2, 1, 2, 1, 1), (32, 4, 4, 2, 3, 2, 2, 1, 1, 1),
                                  (32, 4, 4, 4, 3, 2, 1, 2, 3, 1), (2, 8, 6, 1, 3, 2, 1, 1, 1, 1)],
                         ids=["all_live", "one_end", "padding_short", "small_batch"])
def test_dead_taps_kept_when_not_both_ends(case, monkeypatch):
    inputs, conv, grad_out = float32_layer(case)
    results = []
    for mode in ("auto", "never"):
        monkeypatch.setenv("ODCONV_CPU_DEAD_TAPS", mode)
        results.append([torch.ops.odconv.odconv2d(*inputs, *conv),
                        *torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, True])])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@requires_extension
def test_dead_taps_override_is_checked(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_DEAD_TAPS", "always")
    x, w, ch, f, s, a = make_inputs(2, 8, 8, 1, 3, 2, 1, dtype=torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_DEAD_TAPS.*auto or never.*'always'"):
        torch.ops.odconv.odconv2d(x, w, ch, f, s, a, [1, 1], [1, 1], [1, 1], 1)


# ---- Depthwise layers (one input and one output channel per group) go plane block by plane block through
# csrc/cpu/depthwise_cpu.cpp, sixteen channels at a time over the taps inside the map; ODCONV_CPU_DEPTHWISE=never
# sends them to the convolution path. Channels in blocks of 16 and a ragged last one, runs of four interior
# output pixels and border pixels one by one, a 7x7 kernel on a 7x7 map (no interior pixel), stride 2 with and
# without padding on a rectangular map, dilation 2, an even kernel, batch 1, K = 1 and 5, planes of whole
# 16-pixel transposes and a tail; a channel multiplier of 2 (not depthwise: the convolution path either way);
# float32 on AVX-512 forwards rows of 8 pixels on small maps (7x7 with a 7x7 kernel, 6x6 from stride 2, 11x11
# with a dilated 5x5 kernel: 8 + 3 pixels a row), and runs of 8 interior pixels on larger ones (21x21 5x5,
# 12x12 dilated, 19 wide at stride 2, 30 wide at stride 3: interior_run8's three steps). ---------------------
DEPTHWISE = [
    (3, 20, 20, 9, 3, 4, 1, 1, 1, 20),
    (2, 16, 16, 7, 7, 3, 1, 3, 1, 16),
    (2, 37, 37, (11, 19), 3, 2, 2, 1, 1, 37),
    (1, 24, 24, 12, 3, 5, 1, 2, 2, 24),
    (3, 8, 8, 10, 4, 1, 1, 1, 1, 8),
    (2, 18, 18, 13, 3, 4, 2, 0, 1, 18),
    (2, 33, 33, 21, 5, 4, 1, 2, 1, 33),
    (2, 12, 24, 8, 3, 4, 1, 1, 1, 12),
    (2, 20, 20, 11, 5, 3, 1, 4, 2, 20),
    (1, 17, 17, 30, 3, 2, 3, 1, 1, 17),  # a run of 8 interior pixels at stride 3 (interior_run8's generic step)
]


@requires_extension
@pytest.mark.parametrize("path", ["auto", "never"])
@pytest.mark.parametrize("case", DEPTHWISE, ids=case_id)
def test_depthwise_matches_reference(case, path, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_DEPTHWISE", path)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_depthwise_16_bit(dtype):
    # (on float32 copies)
    assert_case_matches_reference(DEPTHWISE[0], (dtype,))


@requires_extension
@pytest.mark.parametrize("conv", [((1, 1), (1, 1), (1, 1)), ((2, 2), (2, 2), (2, 2))], ids=["plain", "stride2_dilation2"])
def test_depthwise_gradcheck(conv):
    inputs = make_inputs(2, 18, 18, 7, 3, 3, 18)
    assert torch.autograd.gradcheck(lambda *t: ext(t, *conv, 18), inputs, eps=1e-6, atol=1e-7)


@requires_extension
@pytest.mark.parametrize("case", DEPTHWISE[:3], ids=case_id)
def test_depthwise_gradient_groups(case):
    # grad_x alone and the parameter gradients alone are bit for bit the full backward's
    assert_gradient_groups_agree(case, tol=0, check_reference=True)


@requires_extension
def test_depthwise_takes_its_path(monkeypatch):
    inputs, conv, grad_out = float32_layer(DEPTHWISE[0])
    results = []
    for mode in ("auto", "never"):
        monkeypatch.setenv("ODCONV_CPU_DEPTHWISE", mode)
        results.append([torch.ops.odconv.odconv2d(*inputs, *conv),
                        *torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, True])])
    assert not any(torch.equal(a, b) for a, b in zip(*results))  # other sums, other roundings, in every output


@requires_extension
def test_depthwise_override_is_checked(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_DEPTHWISE", "always")
    x, w, ch, f, s, a = make_inputs(2, 8, 8, 6, 3, 2, 8, dtype=torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_DEPTHWISE.*auto or never.*'always'"):
        torch.ops.odconv.odconv2d(x, w, ch, f, s, a, [1, 1], [1, 1], [1, 1], 8)


# ---- float32 rows of stride 2 in im2col (forward, im2row) and col2im (grad_x) move 16 outputs at a
# time on AVX-512 with masked ends: output widths around that block, padding, dilation, stride 2 in
# width only, on the GEMM path (the convolution path has no im2col), both backward splits. ---------
STRIDE2_ROWS = [
    (2, 3, 4, (5, 2), 3, 2, 2, 1, 1, 1),         # Wo = 1
    (2, 3, 4, (5, 31), 3, 2, 2, 1, 1, 1),        # Wo = 16
    (2, 3, 4, (5, 33), 3, 2, 2, 1, 1, 1),        # Wo = 17
    (2, 3, 4, (4, 30), 3, 2, 2, 0, 1, 1),        # Wo = 14, no padding
    (2, 3, 4, (6, 67), 3, 2, 2, 2, 2, 1),        # Wo = 34, dilation 2
    (2, 3, 4, (5, 36), 5, 2, (1, 2), 2, 1, 1),   # Wo = 18, stride 2 in width only
]
# Stride 2 both ways with Wo = ceil(W/2) splits x into its four phases (even/odd rows and columns):
# odd sizes, 1x1, 2x2 without padding, 7x7, rows padded otherwise than columns (Ho != ceil(H/2)).
STRIDE2_PHASES = [
    (2, 3, 4, (7, 9), 3, 2, 2, 1, 1, 1),         # odd H and W
    (2, 3, 4, (7, 9), 1, 2, 2, 0, 1, 1),         # 1x1
    (2, 3, 4, (6, 8), 2, 2, 2, 0, 1, 1),         # 2x2, no padding
    (2, 3, 4, (9, 11), 7, 2, 2, 3, 1, 1),        # 7x7, taps wholly in the padding
    (2, 3, 4, (7, 9), 3, 2, 2, (0, 1), 1, 1),    # Ho = 3 != ceil(H/2)
    (2, 4, 4, (4, 33), 3, 2, 2, 1, 1, 2),        # Wo = 17, two groups
]


# ---- stride-1 layers whose output is as wide as the input copy (im2col, im2row) and add (col2im)
# each tap's valid rows in one contiguous run, then fix the elements past the map's left and right
# edges: dilation, padding of the rows other than "same" (Ho != H), taps whose rows or columns lie
# wholly in the padding, one-row maps, widths past a 16-lane vector; on the GEMM path (the
# convolution path has no im2col), both backward splits. -------------------------------------------
CONTIGUOUS_TAPS = [
    (2, 3, 4, 12, 3, 2, 1, 1, 1, 1),               # 3x3 "same" on 12x12
    (2, 3, 4, (5, 7), 5, 2, 1, 2, 1, 1),           # 5x5: two columns past each edge
    (2, 3, 4, (6, 9), 3, 2, 1, 2, 2, 1),           # dilation 2
    (2, 3, 4, (6, 9), 3, 2, 1, (0, 1), 1, 1),      # Ho = H - 2, Wo = W
    (2, 3, 4, (3, 4), 5, 2, 1, (4, 2), 1, 1),      # rows padded by more than the kernel reaches
    (2, 3, 4, (4, 2), 5, 2, 1, 2, 1, 1),           # W = 2 < pad: the outer taps read no column
    (2, 3, 4, (1, 17), (1, 3), 2, 1, (0, 1), 1, 1),  # one-row map
    (2, 4, 4, (3, 40), 3, 2, 1, 1, 1, 2),          # 40 wide, two groups
]


# Contiguous taps (stride 1, and stride 2 in phases) on maps of at most 256 output pixels copy and add
# each tap's row in one masked loop over a zero-bordered copy of the plane (ODCONV_CPU_MASKED_TAPS=auto);
# "always" and "never" force either way on every case.
@requires_extension
@pytest.mark.parametrize("masked", ["always", "never"])
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("case", STRIDE2_ROWS + STRIDE2_PHASES + CONTIGUOUS_TAPS, ids=case_id)
def test_im2col_rows_match_reference(case, split, masked, monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_CONV_PATH", "never")
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    monkeypatch.setenv("ODCONV_CPU_MASKED_TAPS", masked)
    assert_case_matches_reference(case)


# ---- the backward by columns on maps of at most Cout/2 pixels multiplies gy^T @ Wb for grad_x (no
# transpose of Wb), and with the parameter gradients builds Wb inside their reduction pass: K up to
# 4 (registers) and above, stride 2, ragged row tiles, 1x1 kernels without im2col (gcols^T transposed
# straight into grad_x); each gradient group alone and both. ------------------------------------------
TRANSPOSED_GRAD_X = [
    (4, 64, 48, 4, 3, 4, 1, 1, 1, 1),      # P = 16, two row tiles of 24
    (3, 70, 40, 4, 3, 6, 1, 1, 1, 1),      # K = 6: the any-K reduction
    (3, 130, 10, 3, 3, 3, 2, 1, 1, 1),     # stride 2, P = 4
    (2, 40, 70, 5, 3, 2, 1, 1, 2, 1),      # dilation 2, row tiles of 24 + 24 + 22
    (3, 200, 72, 4, 1, 3, 1, 0, 1, 1),     # 1x1, P = 16: three row tiles of 24, parts of 66-67 channels
    (2, 96, 40, 7, 1, 4, 1, 0, 1, 1),      # 1x1, P = 49 > Cout/2: the plain product writes grad_x itself
    (2, 30, 170, 9, 1, 3, 1, 0, 1, 1),     # 1x1, P = 81: above the folded maps, gcols^T transposed into grad_x
]


# ---- the folded backward: both gradient groups on maps of at most 36 pixels (144 on AVX-512; 64 with 1x1 kernels
# without im2col) that take the transposed grad_x product. The products give Q' = gy @ (rows * m), the reduction
# runs over 4 samples per pass along a row of W_k, grad_W comes from Q' and grad_m from the grad_x product.
# Batches that leave 1-3 samples for the last pass, K from 1 to 8, two chunks, stride 2; blocks of a part's
# channels (in float64 with K = 8, 32 channels of 3x3 and a ragged block) worked through chunk by chunk;
# and input scales too small to divide by. ---------------------------------------------------------------
FOLDED_BACKWARD = [
    (5, 40, 32, 4, 3, 4, 1, 1, 1, 1),      # P = 16: a pass of 4 samples, then 1
    (6, 24, 72, 6, 3, 3, 1, 1, 1, 1),      # P = 36, the largest folded map; passes of 4 + 2
    (7, 20, 16, 2, 3, 8, 1, 1, 1, 1),      # P = 4, K = 8: kernels in two chunks of 4; passes of 4 + 3 samples
    (6, 24, 40, 4, 3, 6, 1, 1, 1, 1),      # K = 6: kernels in chunks of 4 + 2; passes of 4 + 2 samples
    (40, 16, 40, 4, 3, 2, 1, 1, 1, 1),     # two chunks of 20, Q' and A of 8 + 8 + 4 at a time: all add into grad_W
    (3, 30, 18, 5, 3, 1, 2, 1, 1, 1),      # stride 2 (P = 9), K = 1
    # 33-34 channels per part: float64 blocks of 32 + 1-2; chunks of 12 (8 + 4) in float32, of 6 in float64
    (36, 100, 40, 4, 3, 8, 1, 1, 1, 1),
    (6, 140, 72, 6, 1, 3, 1, 0, 1, 1),     # 1x1 without im2col: gcols = Y m is grad_x itself
    (5, 40, 100, 7, 1, 4, 1, 0, 1, 1),     # 1x1 on 7x7 (P = 49 > 36): folded without im2col only
    (3, 24, 128, 8, 1, 2, 1, 0, 1, 1),     # 1x1 on 8x8, the largest folded map without im2col
    (5, 24, 100, 7, 3, 4, 1, 1, 1, 1),     # 3x3 on 7x7: folded on AVX-512, passes of 4 + 1
    (3, 24, 128, 8, 3, 4, 1, 1, 1, 1),     # 3x3 on 8x8 (P = Cout/2): folded on AVX-512
    (2, 16, 288, 12, 3, 2, 1, 1, 1, 1),    # 3x3 on 12x12 (P = 144 = Cout/2): the largest folded map on AVX-512
]


# ---- the backward by columns works block by block of a part's channels, chunk by chunk of the batch inside a
# block; a block's tile of W_k stays within 512 KB, so in float64 with K = 8 a block holds at most 256 columns
# (fewer than 32 rows: 512 KB / (8 K x rows x 8 B)): several blocks per part and a ragged last block, with
# grad_x by Wb^T @ gy (maps larger than Cout/2 pixels), by gy^T @ Wb on maps of more than 36 pixels (not
# folded), on 1x1 kernels without im2col (gy^T @ Wb, each block's gcols^T transposed into its channels
# of grad_x); each gradient group alone and both (in float32 one block). -------------------------------
BLOCK_CASES = [
    (3, 150, 20, 8, 3, 8, 1, 1, 1, 1),     # P = 64 > Cout/2: parts of 50 channels in blocks of 32 + 18
    (3, 100, 100, 7, 3, 8, 1, 1, 1, 1),    # P = 49 <= Cout/2, above the folded maps (folded on AVX-512): 32 + 1-2
    (2, 3300, 8, 2, 1, 8, 1, 0, 1, 1),     # 1x1 without im2col: parts of 1100 channels in blocks of 560 + 540
    (40, 100, 40, 6, 3, 8, 1, 1, 1, 1),    # folded (P = 36): 32 + 1-2, two chunks per block
    # folded, 1x1 on 4x4 with 800 rows: 8 MB of W_k and grad_W would cut a part's 380 channels into blocks of
    # 163 columns (float64; 327 in float32), the folded backward's 384 columns at least keep them in one block
    (2, 1140, 800, 4, 1, 4, 1, 0, 1, 1),
    (3, 40, 24, 9, 3, 7, 1, 1, 1, 1),      # not folded (P = 81 > Cout/2), K = 7: the reduction's kernels in 4 + 3
    # not folded, chunks of one sample in float64 (two in float32: im2row and gcols fill the budget); G kept for 7
    # samples (14) before the grad_W products: products after 7, 14 and 16 (after 14 and 16)
    (16, 96, 128, 12, 3, 4, 1, 1, 1, 1),
]


@requires_extension
@pytest.mark.parametrize("case", TRANSPOSED_GRAD_X + FOLDED_BACKWARD + BLOCK_CASES, ids=case_id)
def test_backward_by_columns_cases_match_reference(case, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    num_threads(3)
    assert_gradient_groups_agree(case, tol=1e-12, check_reference=True)
    assert_case_matches_reference(case, (torch.float32,))


@requires_extension
def test_transposed_grad_x_of_1x1_kernels_gradcheck(monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    num_threads(2)
    inputs = make_inputs(3, 20, 8, 2, 1, 2, 1)  # 1x1 without im2col, P = 4 <= Cout / 2: gcols^T into grad_x
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (0, 0), (1, 1), 1), inputs, eps=1e-6, atol=1e-7)


@requires_extension
@pytest.mark.parametrize("kernel_num", [3, 6])  # K = 6: the reduction's kernels in chunks of 4 + 2
def test_folded_backward_gradcheck(kernel_num, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    num_threads(2)
    inputs = make_inputs(5, 8, 8, 2, 3, kernel_num, 1)  # P = 4, Cout = 8: folded; passes of 4 + 1 samples
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (1, 1), (1, 1), 1), inputs, eps=1e-6, atol=1e-7)


@requires_extension
@pytest.mark.parametrize("kernel", [3, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_folded_backward_with_vanishing_input_scale(dtype, kernel, monkeypatch, num_threads):
    # grad_m is sum_p rows' * Y / m: where m = channel * spatial is below the square root of the smallest normal
    # number (an attention of exactly 0, or 1e-25 in float32 and 1e-160 in float64) it comes from x instead;
    # 3x3, and 1x1 without im2col
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    num_threads(2)
    inputs = [t.detach() for t in make_inputs(5, 40, 32, 4, kernel, 4, 1, dtype=dtype)]
    inputs[2][:, 0] = 0
    inputs[2][:, 1] = 1e-25 if dtype == torch.float32 else 1e-160
    inputs = [t.requires_grad_() for t in inputs]
    padding = (kernel // 2, kernel // 2)
    assert_matches_reference(inputs, (1, 1), padding, (1, 1), 1, dtype)
    # those channels' attention gradients are not zero: the divisions would have given inf or nan there
    out = ext(inputs, (1, 1), padding, (1, 1), 1)
    grad_channel = torch.autograd.grad(out, inputs[2], torch.ones_like(out))[0]
    assert torch.isfinite(grad_channel).all() and (grad_channel[:, :2] != 0).all()


# On AVX-512 the folded backward's float32 reduction pass adds grad_W too (ODCONV_CPU_FOLDED_GRAD_W=auto; K > 4 in
# chunks of 4); elsewhere the (K x samples) @ (samples x columns) products after the pass do. Both ways against the
# reference (on other CPUs both are the products), then the choice on 64 and 512 rows; 24 samples: sub-chunks of 8,
# passes of 4, so the two orders of grad_W's sums differ in their roundings.
@requires_extension
@pytest.mark.parametrize("grad_w", ["reduction", "products"])
@pytest.mark.parametrize("case", FOLDED_BACKWARD, ids=case_id)
def test_folded_grad_w_both_ways_match_reference(case, grad_w, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    monkeypatch.setenv("ODCONV_CPU_FOLDED_GRAD_W", grad_w)
    num_threads(3)
    assert_case_matches_reference(case, (torch.float32,))


@requires_extension
@pytest.mark.skipif(not AVX512_CODE, reason="the reduction adds grad_W in AVX-512 code only")
@pytest.mark.parametrize("case", [(24, 64, 512, 4, 3, 4, 1, 1, 1, 1), (24, 64, 64, 4, 3, 4, 1, 1, 1, 1)], ids=case_id)
def test_folded_grad_w_choice(case, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_FOLDED_GRAD_W", (None, "reduction"), monkeypatch,
                      values=("reduction", "products"))


@requires_extension
def test_bad_folded_grad_w_names_the_variable(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "columns")
    monkeypatch.setenv("ODCONV_CPU_FOLDED_GRAD_W", "fused")
    inputs = make_inputs(5, 40, 32, 4, 3, 4, 1)
    out = ext(inputs, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_FOLDED_GRAD_W.*auto, reduction or products.*'fused'"):
        out.sum().backward()



# ---- the two splits of the CPU backward: samples between threads (one parallel region per weight
# tile) and ranges of input channels (columns of J, at least 64 per thread), cut at the groups'
# boundaries. ODCONV_CPU_BACKWARD_SPLIT forces one; at 3 threads layers with G*J >= 192 get three
# ranges, narrower ones fewer. ----------------------------------------------------------------------
SPLIT_CASES = [case for case in GRID if unpack(case)[0] > 0] + BLOCKING + [
    # groups by columns: 3 ranges of 2 channels over 2 groups of 3 (the middle one in both groups)
    (3, 6, 10, 5, 3, 2, 1, 1, 1, 2),
    (3, 24, 64, 4, 3, 3, 1, 1, 1, 2),      # 32 rows per group on 4x4 (P <= rows / 2): folded
    (2, 16, 256, 16, 3, 2, 2, 1, 1, 2),    # 128 rows per group onto 8x8: transposed grad_x, not folded
    (3, 8, 64, 4, 1, 2, 1, 0, 1, 2),       # 1x1 without im2col, folded: gcols is grad_x
    (3, 16, 24, 5, 1, 2, 1, 0, 1, 2),      # 1x1 without im2col, plain product into grad_x
    (2, 8, 80, 6, 3, 5, 1, 1, 1, 2),       # 40 rows per group: row tiles of 20 in one panel, K = 5
    (2, 160, 66, 4, 3, 4, 1, 1, 1, 2),     # J = 720 per group: two blocks per group in float64
    (4, 14, 33, 5, 3, 2, 1, 1, 1, 1),      # J = 126: one range of columns, row tiles of 17 + 16
    (3, 130, 10, 3, 3, 3, 2, 1, 1, 1),     # stride 2, J = 1170 in 3 ranges, fewer output channels than a tile
    (40, 8, 5, 5, 3, 2, 1, 1, 1, 1),       # two chunks of 20 samples, the second accumulating into grad_W
    # the plain grad_x product gathers row tiles into panels until they hold 128 rows: 200 rows in
    # tiles of 29 (the last 26), panels of 145 + 55 rows; 125 rows in tiles of 32 (the last 29), one panel
    (3, 12, 200, 12, 3, 2, 1, 1, 1, 1),
    (2, 10, 125, 11, 3, 3, 1, 1, 1, 1),
]


@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=case_id)
def test_both_backward_splits_match_reference(case, split, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    num_threads(3)
    assert_case_matches_reference(case)


# ---- On CPUs with AVX-512, float32 products whose last block of 16 columns is ragged by 1-4 columns, with 16+
# rows and an inner dimension of 16+, multiply those columns in a kernel of their own (ODCONV_CPU_RAGGED_TAIL=auto;
# tails of 5-15 stay with brgemm): both ways against the reference, on maps of 17-24 pixels (tails of 1-8) and
# 7x7 through grouped layers (whose forward multiplies Wb @ cols, N = the map's pixels, K = 288 columns of a
# group: through brgemm), 17 rows per group (the kernel's steps of 4 rows leave 1).
RAGGED_TAILS = [(3, 64, 34, size, 3, 2, 1, 1, 1, 2)
                for size in [(1, 17), (3, 6), (1, 19), (4, 5), (3, 7), (2, 11), (1, 23), (4, 6), 7]]


@requires_extension
@pytest.mark.parametrize("tail", ["auto", "never"])
@pytest.mark.parametrize("case", RAGGED_TAILS, ids=case_id)
def test_ragged_tails_match_reference(case, tail, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_RAGGED_TAIL", tail)
    num_threads(2)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.skipif(not AVX512_CODE, reason="the tail kernel is AVX-512 code")
@pytest.mark.parametrize("case,taken", [(RAGGED_TAILS[0], True), (RAGGED_TAILS[3], True), (RAGGED_TAILS[4], False),
                                        (RAGGED_TAILS[7], False)], ids=["tail_1", "tail_4", "tail_5", "tail_8"])
def test_ragged_tail_is_taken(case, taken, monkeypatch):
    # with tails of 1-4 auto's float32 forward differs from the one with the tail left to brgemm (other
    # roundings); with 5-8 it is that one
    inputs, conv, _ = float32_layer(case)
    outs = {}
    for tail in ("auto", "never"):
        monkeypatch.setenv("ODCONV_CPU_RAGGED_TAIL", tail)
        outs[tail] = torch.ops.odconv.odconv2d(*inputs, *conv)
    assert torch.equal(outs["auto"], outs["never"]) != taken


@requires_extension
def test_bad_ragged_tail_names_the_variable(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_RAGGED_TAIL", "always")
    with pytest.raises(RuntimeError, match="ODCONV_CPU_RAGGED_TAIL.*auto or never.*'always'"):
        ext(make_inputs(2, 4, 4, 5, 3, 2, 1), (1, 1), (1, 1), (1, 1), 1)


# auto splits by columns where every thread gets a range of at least 64 columns (J summed over the groups), with
# or without groups, and the samples otherwise
@requires_extension
@pytest.mark.parametrize("case,want", [((4, 32, 40, 7, 3, 2, 1, 1, 1, 1), "columns"),
                                       ((4, 48, 96, 7, 3, 2, 1, 1, 1, 4), "columns"),
                                       ((4, 16, 24, 6, 3, 2, 1, 1, 1, 2), "columns"),
                                       ((4, 16, 24, 6, 3, 2, 1, 1, 1, 2), "samples")],
                         ids=["dense", "4_groups", "2_groups_144_columns_2_threads", "2_groups_144_columns_3_threads"])
def test_backward_split_choice(case, want, monkeypatch, num_threads):
    # 16 channels of 3x3 taps: 144 columns, two ranges of 64+ (one per thread) at 2 threads, not three at 3
    num_threads(3 if want == "samples" else 2)
    assert_auto_takes(case, "ODCONV_CPU_BACKWARD_SPLIT", (None, want), monkeypatch, values=("columns", "samples"))


@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
def test_both_backward_splits_gradcheck(split, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    num_threads(2)
    inputs = make_inputs(2, 17, 3, 3, 3, 2, 1)  # J = 153: two ranges of columns (8 + 9 channels)
    assert torch.autograd.gradcheck(lambda *t: ext(t, (1, 1), (1, 1), (1, 1), 1), inputs, eps=1e-6, atol=1e-7)


# The backward multiplies grad_x transposed, gcols^T = gy^T @ Wb, on maps like 7x7, 6x6 and 5x5 with at least 64
# rows per group, and (split by columns) on maps of at most half a group's rows
# (ODCONV_CPU_BACKWARD_TRANSPOSED_GX=auto), as gcols = Wb^T @ gy otherwise: both ways and both splits against the
# reference in float64 and float32, with groups, a dense layer whose J = 1350 is cut in tiles (row blocks
# accumulate into gcols^T), stride 2 onto 5x5, a 5x10 map (50 pixels: folded on AVX-512 only), a 10x16 map (160
# pixels, half the rows: transposed by columns, never folded), and 3 threads (uneven runs).
BACKWARD_TRANSPOSED_GX = [
    (3, 128, 128, 7, 3, 2, 1, 1, 1, 2),   # two groups of 64 rows: transposed by default
    (4, 24, 36, 6, 3, 3, 1, 1, 1, 3),     # three groups of 12 rows: plain by default
    (3, 150, 40, 6, 3, 4, 1, 1, 1, 1),    # dense, tiles cut in J
    (5, 16, 64, 10, 3, 2, 2, 1, 1, 1),    # stride 2 onto 5x5
    (2, 16, 128, (5, 10), 3, 2, 1, 1, 1, 2),  # 64 rows per group, 50 pixels
    (2, 8, 320, (10, 16), 3, 2, 1, 1, 1, 1),  # 160 pixels, 320 rows
]


@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("mode", ["always", "never"])
@pytest.mark.parametrize("case", BACKWARD_TRANSPOSED_GX, ids=case_id)
def test_backward_transposed_grad_x_matches_reference(case, mode, split, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_TRANSPOSED_GX", mode)
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    num_threads(3)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("case,want", [(BACKWARD_TRANSPOSED_GX[0], "always"), (BACKWARD_TRANSPOSED_GX[1], "never"),
                                       (BACKWARD_TRANSPOSED_GX[4], "always")],
                         ids=["64_rows", "12_rows", "64_rows_50_pixels"])
def test_backward_transposed_grad_x_choice(case, want, split, monkeypatch, num_threads):
    # auto gives bit for bit the wanted variant's backward, and not the other's (the forward does not read it)
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    num_threads(2)
    assert_auto_takes(case, "ODCONV_CPU_BACKWARD_TRANSPOSED_GX", (None, want), monkeypatch)
    if split == "columns":  # there both gradient groups fold the input scale into the products (other roundings)
        return
    # grad_x alone (no im2row buffer: col2im's input has its own) is grad_x computed with the other gradients
    inputs, conv, grad_out = float32_layer(case)
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_TRANSPOSED_GX", "always")
    alone = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, False])[0]
    with_params = torch.ops.odconv.odconv2d_backward(grad_out, *inputs, *conv, [True, True])[0]
    assert torch.equal(alone, with_params)


# On AVX-512 the backward by columns also takes the transposed product (and so folds) with both gradient groups
# on maps of up to 100 pixels that are not a multiple of 16, with 64+ rows per group: 10x10 there, not 8x8 (a
# multiple of 16) nor with 32 rows; the samples split and other CPUs keep the plain product on these maps.
@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("case,folds", [((3, 16, 64, 10, 3, 2, 1, 1, 1, 1), True),
                                        ((3, 16, 64, 8, 3, 2, 1, 1, 1, 1), False),
                                        ((3, 16, 32, 10, 3, 2, 1, 1, 1, 1), False)],
                         ids=["10x10_64_rows", "8x8_64_rows", "10x10_32_rows"])
def test_transposed_grad_x_on_ragged_folded_maps(case, folds, split, monkeypatch, num_threads):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    num_threads(2)
    want = "always" if folds and split == "columns" and AVX512 else "never"
    assert_auto_takes(case, "ODCONV_CPU_BACKWARD_TRANSPOSED_GX", (None, want), monkeypatch)


@requires_extension
def test_bad_backward_transposed_grad_x_names_the_variable(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_TRANSPOSED_GX", "sometimes")
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "samples")  # the runs of samples read it
    inputs = make_inputs(2, 4, 4, 5, 3, 2, 1)
    out = ext(inputs, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_BACKWARD_TRANSPOSED_GX.*auto, always or never.*'sometimes'"):
        out.sum().backward()


@requires_extension
def test_bad_backward_split_names_the_variable(monkeypatch):
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", "rows")
    inputs = make_inputs(2, 4, 4, 5, 3, 2, 1)
    out = ext(inputs, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(RuntimeError, match="ODCONV_CPU_BACKWARD_SPLIT.*auto, samples or columns.*'rows'"):
        out.sum().backward()


@requires_extension
@pytest.mark.parametrize("case", [(9, 80, 67, 16, 3, 3, 1, 1, 1, 1), (9, 201, 70, 4, 3, 4, 1, 1, 1, 1)],
                         ids=["panels", "cut_in_J"])
def test_blocking_independent_of_thread_count(case):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(case)
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3, 16):  # 16: more threads than samples (the GPU machine has 16 cores)
            torch.set_num_threads(n)
            out = ext(inputs, stride, padding, dilation, groups)
            results.append([out.detach()] + list(torch.autograd.grad(out.sum(), inputs)))
    finally:
        torch.set_num_threads(threads)
    for many_threads in results[1:]:
        for one, many in zip(results[0], many_threads):
            torch.testing.assert_close(one, many, rtol=1e-12, atol=1e-12)


# Batches smaller than the thread count: the forward splits each sample's output rows between
# threads (ranges of at least 8 rows, or of whole groups), and im2col by input channels.
SMALL_BATCHES = [
    (1, 32, 40, 12, 3, 4, 1, 1, 1, 1),     # one tile, split into row ranges (8 rows each at 16 threads)
    (2, 201, 70, 4, 3, 4, 1, 1, 1, 1),     # tiles cut in J: each row range has several column blocks
    (1, 16, 24, 7, 3, 3, 1, 1, 1, 4),      # groups: ranges of whole groups
    (3, 192, 36, 6, 1, 4, 1, 0, 1, 1),     # im2col-free (1x1)
    (1, 9, 12, 10, 3, 2, 2, 1, 2, 1),      # stride and dilation 2; 12 rows: 8 + 4
]


@requires_extension
@pytest.mark.parametrize("threads", [2, 16])
@pytest.mark.parametrize("case", SMALL_BATCHES, ids=case_id)
def test_small_batches_split_rows_between_threads(case, threads, num_threads):
    num_threads(threads)
    assert_case_matches_reference(case)


@requires_extension
@pytest.mark.parametrize("split", ["samples", "columns"])
@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize("channels", [(60, 45), (201, 70)], ids=["row_tiles", "cut_in_J"])
def test_backward_over_several_chunks_and_uneven_runs(threads, channels, split, monkeypatch):
    # 37 samples: several chunks (buffers reused from chunk to chunk), runs of unequal length, and
    # grad_W summed over chunks and runs; 60 -> 45 channels, 3x3: two row tiles in float64; 201 -> 70:
    # tiles cut in J, whose grad_W partials are added row by row
    monkeypatch.setenv("ODCONV_CPU_BACKWARD_SPLIT", split)
    inputs = make_inputs(37, *channels, 5, 3, 3, 1, dtype=torch.float64)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert_matches_reference(inputs, (1, 1), (1, 1), (1, 1), 1, torch.float64)
    finally:
        torch.set_num_threads(saved)


@requires_extension
def test_cpu_autocast_runs_in_bfloat16():
    torch.manual_seed(0)
    layer = odconv.ODConv2d(8, 16, 3, padding=1)
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)  # mixed dtypes reach the op (bf16 attentions from autocast convs, fp32 weight)
        direct = torch.ops.odconv.odconv2d(x, layer.weight, *layer.attention(x), [1, 1], [1, 1], [1, 1], 1)
    assert out.dtype == torch.bfloat16 and direct.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    out.float().square().mean().backward()
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()
    assert layer.attention.kernel_fc.weight.grad is not None


def test_missing_cpu_features():
    from odconv.ops import _missing_cpu_features
    build = {"required_cpu_features": ["avx2", "avx512f", "fma"]}
    assert _missing_cpu_features(build, {"avx2", "fma", "sse4_2"}) == ["avx512f"]
    assert _missing_cpu_features(build, {"avx2", "avx512f", "fma"}) == []
    assert _missing_cpu_features(build, None) == []                    # no /proc/cpuinfo: cannot tell
    assert _missing_cpu_features({}, {"sse2"}) == []                    # a build that did not record them
    assert _missing_cpu_features({"required_cpu_features": None}, {"sse2"}) == []


def _package_in_subprocess(setup_code):
    """Runs setup_code, imports odconv, trains a step of one layer and returns backend_info()."""
    code = setup_code + (
        "import json, torch, odconv\n"
        "undo_setup()\n"
        "layer = odconv.ODConv2d(4, 8, 3, padding=1)\n"
        "layer(torch.randn(2, 4, 6, 6)).sum().backward()\n"
        "print(json.dumps(odconv.backend_info()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "ODCONV_BACKEND"})
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not odconv.backend_info()["build"].get("required_cpu_features"),
                    reason="this build recorded no instruction-set features (not x86, or an older setup.py)")
def test_build_for_another_cpu_falls_back_to_the_reference():
    """An extension compiled with -march=native elsewhere is not loaded on a CPU without its instructions."""
    info = _package_in_subprocess(
        "import builtins, io, sys, importlib.abc\n"
        "real_open = builtins.open\n"
        "def fake_open(path, *args, **kwargs):\n"
        "    if path == '/proc/cpuinfo': return io.StringIO('processor : 0\\nflags : fpu sse sse2\\n')\n"
        "    return real_open(path, *args, **kwargs)\n"
        "builtins.open = fake_open\n"
        "def undo_setup(): builtins.open = real_open\n"
        "class Watch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'odconv._C': raise AssertionError('tried to load the extension')\n"
        "sys.meta_path.insert(0, Watch())\n")
    assert info["cpu"]["backend"] == "reference"
    assert "which this CPU lacks" in info["cpu"]["reason"] and "avx" in info["cpu"]["reason"], info["cpu"]


def test_package_works_without_the_extension():
    """A failed or missing build leaves a working package on the reference path, saying why."""
    info = _package_in_subprocess(
        "import sys, importlib.abc\n"
        "def undo_setup(): pass\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'odconv._C': raise ImportError('simulated: no compiled extension')\n"
        "sys.meta_path.insert(0, Block())\n")
    assert info["cpu"]["backend"] == "reference"
    assert "extension not built" in info["cpu"]["reason"] and "simulated" in info["cpu"]["reason"]


# ---- the float32 forward on 4x4 and 8x8 maps (up to 64 output pixels that multiply Wb @ cols; 6x6,
# 7x7 and smaller maps multiply the transpose) builds the kernels with the scales folded out (m on
# the im2col matrix, f on the output), kFoldedSamples = 4 samples per pass over a tile: K with and
# without an unrolled loop, passes of 4 and fewer samples, tiles cut in J (built row by row) and
# whole groups (one block of W), stride 2 onto 4x4 and 8x8, and on one thread single samples and
# runs of 3. -----------------------------------------------------------------------------------------
FOLDED_FORWARD = [
    (11, 128, 40, 4, 3, 4, 1, 1, 1, 1),   # J = 1152: tiles cut in J; runs of 6 and 5
    (9, 128, 40, 4, 3, 5, 1, 1, 1, 1),    # K = 5: one sample per pass
    (6, 64, 24, 4, 3, 8, 1, 1, 1, 1),     # K = 8
    (8, 16, 24, 4, 3, 3, 1, 1, 1, 2),     # two groups
    (5, 32, 16, 8, 3, 2, 2, 1, 1, 1),     # stride 2 onto a 4x4 output
    (7, 20, 9, 4, 3, 1, 1, 1, 1, 1),      # K = 1, 9 rows
    (3, 300, 40, 4, 3, 4, 1, 1, 1, 1),    # J = 2700 in pieces of 912, 912 and 876: rounded up to 16 columns
    (9, 128, 40, 8, 3, 4, 1, 1, 1, 1),    # P = 64: J = 1152 in pieces of 384 (tiles sized for 8x8 passes)
    (6, 48, 20, 16, 3, 3, 2, 1, 1, 1),    # stride 2 onto an 8x8 output, K = 3
    (5, 16, 24, 8, 3, 2, 1, 1, 1, 2),     # 8x8, two groups
    (17, 128, 40, 8, 3, 4, 1, 1, 1, 1),   # runs of 7 samples' im2col (2 MB, the kernels' size clamped): 6, 6, 5
]


@requires_extension
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", FOLDED_FORWARD, ids=case_id)
def test_folded_forward_matches_reference(case, threads, num_threads):
    num_threads(threads)
    assert_case_matches_reference(case, (torch.float32,))


@requires_extension
@pytest.mark.parametrize("batch", [1, 3])
def test_folded_forward_single_samples_and_short_runs(batch, num_threads):
    # one thread: one run of one sample, or of three (a pass of fewer than kFoldedSamples samples)
    num_threads(1)
    assert_case_matches_reference((batch, 128, 40, 4, 3, 4, 1, 1, 1, 1), (torch.float32,))


# ---- outputs of 32 MiB and more (fresh pages from the system on every call) are advised onto
# transparent huge pages: the output and grad_x of a large map, and grad_W of 512->512 3x3 with
# K = 4 (36 MiB). ---------------------------------------------------------------------------------
HUGE_OUTPUTS = [
    (2, 8, 8, 725, 3, 2, 1, 1, 1, 1),      # out and grad_x: 2 x 8 x 725 x 725 float32, just over 32 MiB
    (1, 512, 512, 2, 3, 4, 1, 1, 1, 1),    # grad_W: 4 x 512 x 512 x 9 float32
]


def _transparent_huge_pages_advisable():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _advised_huge(tensor):
    """Whether the mapping that holds the middle of tensor's storage carries MADV_HUGEPAGE ("hg")."""
    address = tensor.data_ptr() + tensor.nbytes // 2
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                flags = line.split()[1:]
    return flags is not None and "hg" in flags


@requires_extension
@pytest.mark.parametrize("case", HUGE_OUTPUTS, ids=case_id)
def test_huge_outputs_match_reference(case):
    assert_case_matches_reference(case, (torch.float32,))


@requires_extension
@pytest.mark.skipif(not _transparent_huge_pages_advisable(), reason="no transparent huge pages on this system")
def test_huge_outputs_are_advised_onto_huge_pages():
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(HUGE_OUTPUTS[0])
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float32, requires_grad=False)
    out = ext(inputs, stride, padding, dilation, groups)
    grads = torch.ops.odconv.odconv2d_backward(out, *inputs, list(stride), list(padding), list(dilation), groups,
                                               [True, True])
    assert _advised_huge(out) and _advised_huge(grads[0])
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = unpack(HUGE_OUTPUTS[1])
    inputs = make_inputs(batch, cin, cout, size, kernel, K, groups, dtype=torch.float32, requires_grad=False)
    out = ext(inputs, stride, padding, dilation, groups)
    grads = torch.ops.odconv.odconv2d_backward(out, *inputs, list(stride), list(padding), list(dilation), groups,
                                               [True, True])
    assert grads[1].nbytes >= 32 << 20 and _advised_huge(grads[1])


@requires_extension
@pytest.mark.skipif(not _transparent_huge_pages_advisable(), reason="no transparent huge pages on this system")
def test_outputs_below_32_mib_are_not_advised():
    # In a fresh process: in this one an earlier huge output may have come from glibc's heap (a large free
    # block at its top), and the advised part of the heap stays advised for whatever is allocated there later.
    code = inspect.getsource(_advised_huge) + """
import torch, odconv
x = torch.randn(2, 8, 362, 362); w = torch.randn(2, 8, 8, 3, 3) * 0.1
ch, f, s = torch.rand(2, 8), torch.rand(2, 8), torch.rand(2, 3, 3)
a = torch.softmax(torch.randn(2, 2), 1)
conv = ([1, 1], [1, 1], [1, 1], 1)
out = torch.ops.odconv.odconv2d(x, w, ch, f, s, a, *conv)
grads = torch.ops.odconv.odconv2d_backward(out, x, w, ch, f, s, a, *conv, [True, True])
assert 4 << 20 < out.nbytes < 32 << 20 and grads[0].nbytes == out.nbytes
assert not _advised_huge(out) and not _advised_huge(grads[0]), "an output of 8 MiB was advised"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-2000:]
