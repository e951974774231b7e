"""The operator benchmark (benchmarks/bench_op.py): its smoke run validates, times, measures memory and
writes the JSON it promises; its validation catches a wrong backend. The GEMM bound script
(benchmarks/bench_gemm_bound.py), the brgemm column-block timing (benchmarks/bench_brgemm_blocks.py),
the perf profile by library (benchmarks/perf_shares.py), the training-step benchmark (benchmarks/bench_train.py), the A/B scripts (benchmarks/ab_builds.py, ab_env.py) and the shape sweep (benchmarks/sweep_shapes.py) run and report consistent numbers; the GPU check's CPU error probe
(benchmarks/cpu_error_probe.py) passes and the GPU check script (benchmarks/gpu_check.sh) runs its
plumbing without a GPU."""
import json
import os
import re
import subprocess
import sys
import weakref

import pytest
import torch

import odconv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
HAS_CPU_EXTENSION = odconv.backend_info()["cpu"]["backend"] == "extension"
TIMED = ["extension", "reference", "static"] if HAS_CPU_EXTENSION else ["reference", "static"]

sys.path.insert(0, BENCHMARKS)
import bench_op  # noqa: E402
from common import LayerShape, parse_shapes  # noqa: E402
from conftest import GLIBC_LINUX  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench_op_cpu.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_op.py"), "--quick", "--device", "cpu", "--no-compile",
               "--json", str(path)]
    # About 20 s on 2 idle cores; the timeout only guards against a hang (a starved machine can be 10x slower).
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with open(path) as f:
        return json.load(f), proc.stdout


def test_quick_run_reports_machine_and_command(quick_run):
    report, stdout = quick_run
    assert "error" not in report
    assert "--quick" in report["command"]
    for key in ("torch", "device_name", "torch_threads", "date", "cpu_model"):
        assert report["machine"][key], key
    assert report["backend_info"]["cpu"]["backend"] in ("extension", "reference")
    # timed as train.py trains: glibc keeps freed memory (odconv.keep_freed_memory) where it can
    assert report["config"]["keep_freed_memory"] is GLIBC_LINUX
    assert report["shapes"], "no shapes were benchmarked"
    assert "| shape |" in stdout and "worst fwdbwd" in stdout


def test_quick_run_validates_then_times_every_backend(quick_run):
    report, _ = quick_run
    for entry in report["shapes"]:
        shape = LayerShape(**{k: entry["shape"][k] for k in ("batch", "in_channels", "out_channels", "size",
                                                             "kernel", "kernel_num", "stride", "groups")})
        backends = entry["backends"]
        for name in TIMED:
            result = backends[name]
            assert result["validated"] is True, (entry["name"], name, result)
            float64_errors = [err for check, errors in result["checks"].items() if check.startswith("float64")
                              for err in errors.values()]
            assert len(float64_errors) >= 3 and max(float64_errors) <= 1e-9, (entry["name"], name, result["checks"])
            for mode in ("fwd", "fwdbwd"):
                assert result[mode]["median_ms"] > 0, (entry["name"], name, mode, result[mode])
            assert result["mem"]["peak_bytes"] > 0, (entry["name"], name, result["mem"])
        assert backends["compiled_reference"]["validated"] is False
        assert "--no-compile" in backends["compiled_reference"]["skipped"]

        metrics = entry["metrics"]
        assert metrics["floor"] == pytest.approx(1 + shape.kernel_num / shape.out_size ** 2)
        if HAS_CPU_EXTENSION:
            for mode in ("fwd", "fwdbwd"):
                extension, static = backends["extension"][mode]["median_ms"], backends["static"][mode]["median_ms"]
                assert metrics[mode]["target"] == pytest.approx(extension / (static * metrics["floor"]))
                assert metrics[mode]["speedup_vs_reference"] > 0
            assert metrics["mem"]["ratio_to_static"]["extension"] > 0
    if HAS_CPU_EXTENSION:
        assert "fwdbwd extension/(static*floor)" in report["worst"]


def test_validation_rejects_a_wrong_backend():
    shape = LayerShape(4, 6, 8, 7, 3, 3, 1, 2)
    forwards = {b: bench_op.make_forward(b, shape) for b in ("reference", "static")}
    results = bench_op.validate(shape, ["reference", "static"], forwards, "cpu", torch.float32)
    assert all(r["validated"] for r in results.values())

    # Off by one part in 1e6 in the spatial attention's gradient only: the check must still see it.
    class Nudge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return s.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * (1 + 1e-6)

    reference = forwards["reference"]
    forwards["extension"] = lambda x, w, c, f, s, a: reference(x, w, c, f, Nudge.apply(s), a)
    with pytest.raises(bench_op.ValidationError, match="spatial_att"):
        bench_op.validate(shape, ["extension"], forwards, "cpu", torch.float64)


def test_mismatch_stops_the_run(monkeypatch, tmp_path, capsys):
    make_forward = bench_op.make_forward

    def static_without_padding(backend, shape):
        if backend == "static":  # a conv of another layer: padding 0 instead of k//2
            return lambda x, weight: torch.nn.functional.conv2d(x, weight, None, shape.stride, 0, 1, shape.groups)
        return make_forward(backend, shape)

    monkeypatch.setattr(bench_op, "make_forward", static_without_padding)
    path = tmp_path / "bench.json"
    status = bench_op.main(["--device", "cpu", "--shapes", "2,4,4,6,3,2,1,1", "--no-compile", "--backends",
                            "reference,static", "--threads", str(torch.get_num_threads()), "--json", str(path),
                            "--release-memory"])  # in this process: leave its allocator as it is
    assert status == 1
    assert "VALIDATION FAILED" in capsys.readouterr().err
    with open(path) as f:
        assert "static" in json.load(f)["error"]


def test_parse_shapes():
    assert parse_shapes("layer4") == [LayerShape(32, 512, 512, 7, 3, 4, 1, 1), LayerShape(256, 512, 512, 7, 3, 4, 1, 1)]
    assert parse_shapes("layer4;2,8,16,10,3,4,2,4")[-1] == LayerShape(2, 8, 16, 10, 3, 4, 2, 4)
    assert len(parse_shapes("default,layer4,extra")) == 7 + 2 + 5
    assert len(parse_shapes("other")) == 14 and len(set(parse_shapes("other"))) == 14
    mobilenet = parse_shapes("mobilenetv2")
    assert len(set(mobilenet)) == 9 and {s.out_size for s in mobilenet} == {112, 56, 14, 7}
    assert sum(s.groups == s.in_channels for s in mobilenet) == 5 and sum(s.kernel == 1 for s in mobilenet) == 4
    resnet = parse_shapes("resnet50")
    assert len(set(resnet)) == 11 and all(s.kernel == 1 and s.groups == 1 for s in resnet)
    assert {s.out_size for s in resnet} == {56, 28, 14, 7}
    resnext = parse_shapes("resnext50")
    assert len(set(resnext)) == 7 and all(s.kernel == 3 and s.groups == 32 for s in resnext)
    assert [s.out_size for s in resnext] == [56, 28, 28, 14, 14, 7, 7]
    convnext = parse_shapes("convnext")  # stem 224 -> 56, four 7x7 depthwise layers, MLPs, a 2x2 downsampling
    assert len(set(convnext)) == 10 and [s.out_size for s in convnext] == [56, 56, 56, 56, 28, 28, 14, 7, 7, 7]
    assert sum(s.kernel == 7 and s.groups == s.in_channels for s in convnext) == 4
    unpadded = parse_shapes("2,8,16,6,3,4,1,1,0")[0]  # a 4x4 output with every tap inside the 6x6 map
    assert (unpadded.padding, unpadded.out_size, unpadded.name) == (0, 4, "B2 8->16 6x6 k3 K4 s1 g1 p0")
    assert unpadded.conv_args()[1] == (0, 0) and parse_shapes("2,8,16,6,3,4,1,1,1")[0].name.endswith("g1")
    dilated = parse_shapes("8,512,256,21,3,4,1,1,-1,24")[0]  # an atrous layer: padding 24, a 21x21 output
    assert (dilated.padding, dilated.out_size, dilated.name) == (24, 21, "B8 512->256 21x21 k3 K4 s1 g1 d24")
    assert dilated.conv_args() == ((1, 1), (24, 24), (24, 24), 1)
    assert parse_shapes("2,8,16,9,3,4,1,1,1,2")[0].out_size == 7
    for bad in ("nope", "1,2,3", "2,6,8,10,3,4,1,4", "2,8,16,2,5,4,1,1,0", "2,8,16,9,3,4,1,1,-2",
                "2,8,16,9,3,4,1,1,1,0", "2,8,16,9,3,4,1,1,1,2,3"):
        with pytest.raises(ValueError):
            parse_shapes(bad)


def test_default_json_path_keeps_suites_apart():
    names = {shapes: os.path.basename(bench_op.default_json_path("cpu", shapes, "float32"))
             for shapes in ("default", "default,extra", "gtsrb", "layer4;other", "32,256,256,8,3,4,1,1", "gtsrb;4,8,8,6,3,2,1,1")}
    assert names == {"default": "bench_op_cpu.json", "default,extra": "bench_op_cpu.json",
                     "gtsrb": "bench_op_cpu_gtsrb.json", "layer4;other": "bench_op_cpu_layer4_other.json",
                     "32,256,256,8,3,4,1,1": "bench_op_cpu_custom.json", "gtsrb;4,8,8,6,3,2,1,1": "bench_op_cpu_custom.json"}
    assert os.path.basename(bench_op.default_json_path("cuda", "default", "bfloat16")) == "bench_op_cuda_bfloat16.json"
    assert bench_op.parse_args(["--device", "cpu", "--shapes", "other"]).json.endswith("results/bench_op_cpu_other.json")


def test_gemm_bound_smoke_run(tmp_path, capsys):
    import bench_gemm_bound
    path = tmp_path / "bound.json"
    threads = torch.get_num_threads()
    try:
        bench_gemm_bound.main(["--shapes", "2,8,12,6,3,4,1,1;2,8,8,5,3,2,2,4", "--min-run-time", "0.01",
                               "--rounds", "1", "--json", str(path),
                               "--release-memory"])  # in this process: leave its allocator as it is
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["threads"] == 1 and report["machine"]["cpu_model"]
    # where the extension builds, so does the brgemm timing helper (the same compiler and headers)
    assert report["primitives"] == (["bmm", "brgemm"] if HAS_CPU_EXTENSION else report["primitives"])
    assert "bmm" in report["primitives"]
    assert [r["name"] for r in report["results"]] == ["B2 8->12 6x6 k3 K4 s1 g1", "B2 8->8 5x5 k3 K2 s2 g4"]
    for row in report["results"]:
        assert row["name"] in table
        assert set(row["gemm_s"]) == set(report["primitives"])
        for times in row["gemm_s"].values():
            assert set(times) == {"fwd", "gx", "q"} and all(t > 0 for t in times.values())
        for name, by_product in row["variants_s"].items():  # each variant's time, named, the fastest kept
            for product, times in by_product.items():
                assert len(times) == len(report["variants"][name][product])
                assert row["gemm_s"][name][product] == min(times)
        fastest = row["fastest_gemm_s"]
        assert fastest == {p: min(times[p] for times in row["gemm_s"].values()) for p in ("fwd", "gx", "q")}
        floor = row["shape"]["floor"]
        assert row["bound_fwd"] == pytest.approx(fastest["fwd"] / (row["static_fwd_s"] * floor))
        assert row["bound_fwdbwd"] == pytest.approx(sum(fastest.values()) / (row["static_fwdbwd_s"] * floor))
        conv = row["sample_conv_s"]  # the convolution path's bound: one-sample convolutions
        assert set(conv) == {"fwd", "bwd"} and all(t > 0 for t in conv.values())
        assert row["bound_conv_fwd"] == pytest.approx(conv["fwd"] / (row["static_fwd_s"] * floor))
        assert row["bound_conv_fwdbwd"] == pytest.approx((conv["fwd"] + conv["bwd"]) / (row["static_fwdbwd_s"] * floor))


@pytest.mark.parametrize("shared", ["a", "b", "neither"])
def test_gemm_bound_cache_blocks(shared):
    """Blocks of the shared operand fit the budget; without one, blocks of the output do."""
    import bench_gemm_bound
    M, N, K = 512, 16, 4608
    mb, nb, kb = bench_gemm_bound.cache_blocks(M, N, K, shared == "a", shared == "b", elems=65536)
    assert 1 <= mb <= M and 1 <= nb <= N and 1 <= kb <= K
    if shared == "a":
        assert nb == N and mb * kb <= 65536 and mb % 16 == 0
    elif shared == "b":
        assert mb == M and nb == N  # N = 16 columns fit whole
    else:
        assert kb == K and mb * nb <= 65536


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="needs the compiler the extension was built with")
def test_brgemm_blocks_smoke_run(tmp_path, capsys):
    """bench_brgemm_blocks times every product whole and in each block size, and writes what it printed."""
    import bench_brgemm_blocks
    path = tmp_path / "blocks.json"
    threads = torch.get_num_threads()
    try:
        rows = bench_brgemm_blocks.main(["--products", "8,100,40;3,17,5", "--blocks", "16,48", "--rounds", "2",
                                         "--flop-per-round", "1e5", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)  # the script runs on one thread
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["results"] == rows and report["rounds"] == 2 and report["machine"]["cpu_model"]
    assert [(r["M"], r["N"], r["K"]) for r in rows] == [(8, 100, 40), (3, 17, 5)]
    for row in rows:
        assert list(row["gflops"]) == ["whole", "blocks of 16", "blocks of 48"]
        for rates in row["gflops"].values():
            assert len(rates["rounds"]) == 2 and all(r > 0 for r in rates["rounds"])
            assert rates["best"] == max(rates["rounds"])
        assert f"| {row['M']} x {row['K']} @ {row['K']} x {row['N']} |" in table
    with pytest.raises(SystemExit):
        bench_brgemm_blocks.main(["--products", "8,0,40"])


PERF_REPORT = """# Samples: 9K of event 'cpu-clock:ppp'
#
# Overhead  Shared Object
# ........  ...................................
#
    50.10%  [JIT] tid 31337
    30.00%  _C.cpython-311-x86_64-linux-gnu.so
     5.00%  libc.so.6
     4.00%  libgomp.so.1
     3.00%  libtorch_cpu.so
     2.50%  [kernel.kallsyms]
     2.00%  libc10.so
     1.90%  libpython3.11.so.1.0
     1.50%  libscipy_openblas64_-32a4b2a6.so
"""


def test_perf_shares_groups_the_report():
    import perf_shares
    shares = perf_shares.parse_report(PERF_REPORT)
    assert shares == pytest.approx({"jit": 50.1, "extension": 30.0, "libc": 5.0, "kernel": 2.5, "openmp": 4.0,
                                    "torch": 5.0, "python": 1.9, "other": 1.5})


def perf_can_record():
    import shutil
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "record", "-q", "-o", os.devnull, "--", sys.executable, "-c", "pass"],
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="profiles the built extension")
def test_perf_shares_smoke_run(tmp_path, capsys):
    """Where perf can record, each mode's shares are those of the op (its products in oneDNN's JIT code
    and its own code in _C), not of the interpreter's start or exit."""
    if not perf_can_record():
        pytest.skip("perf is missing or may not record here")
    import perf_shares
    path = tmp_path / "shares.json"
    rows = perf_shares.main(["--shapes", "32,64,64,8,3,4,1,1", "--calls", "30", "--json", str(path)])
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["results"] == rows and report["keep_freed_memory"] is True  # the workers keep it by default
    assert [r["mode"] for r in rows] == ["fwd", "bwd"]
    for row in rows:
        shares = row["shares_percent"]
        assert sum(shares.values()) == pytest.approx(100, abs=1)
        # the op's own libraries: its products, its code and its threads' barriers (libgomp, whose share grows
        # when other processes load the machine: jit + extension alone read 37 % once under a concurrent
        # build, 80 % or more alone)
        assert shares["jit"] + shares["extension"] + shares["openmp"] > 50 and shares["python"] < 10, shares
        assert row["ms"] > 0 and row["static_ms"] > 0 and row["jit_ms"] == pytest.approx(row["ms"] * shares["jit"] / 100)
        assert f"| {row['name']} | {row['mode']} |" in table


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="needs the compiler the extension was built with")
def test_gemm_bound_brgemm_products_are_the_products():
    """The compiled helper's blocked products equal torch.matmul's, for a shared and a per-sample operand."""
    import bench_gemm_bound
    products = bench_gemm_bound.load_brgemm()
    assert products is not None
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 40, 70, generator=gen)          # (G, M, K), shared by the samples
    cols = torch.randn(3, 2, 70, 20, generator=gen)    # (batch, G, K, N)
    for blocks in [(40, 20, 70), (16, 16, 32), (7, 5, 9)]:
        out = torch.empty(2, 40, 20)
        products(w, cols[2:].contiguous(), out, 1, *blocks)  # one sample: out holds its product
        torch.testing.assert_close(out, torch.matmul(w, cols[2]), rtol=1e-5, atol=1e-4)
        out_t = torch.empty(2, 20, 40)
        products(cols[2:].transpose(2, 3).contiguous(), w.transpose(1, 2).contiguous(), out_t, 1, *blocks[::-1])
        torch.testing.assert_close(out_t, torch.matmul(cols[2].transpose(1, 2), w.transpose(1, 2)), rtol=1e-5,
                                   atol=1e-4)


def test_train_benchmark_smoke_run(tmp_path):
    path = tmp_path / "train.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "bench_train.py"), "--quick", "--image-size", "16",
               "--rounds", "2", "--json", str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(path.read_text())
    results = report["results"]  # in the order of bench_train.CONFIGS
    assert [(r["conv"], r["amp"]) for r in results] == [
        ("odconv", "none"), ("odconv", "none"), ("static", "none"), ("odconv", "bf16"), ("static", "bf16")]
    assert report["rounds"] == 2
    for r in results:
        assert r["keep_freed_memory"] is GLIBC_LINUX  # as train.py
        assert r["peak_rss_mib"] > 100 if sys.platform.startswith("linux") else True  # torch alone is more
        assert len(r["round_step_ms"]) == 2 and r["step_ms"] == min(r["round_step_ms"])  # the fastest round
        assert r["images_per_s"] == pytest.approx(report["batch_size"] * 1e3 / r["step_ms"])
        assert f"| {r['amp']} | {r['step_ms']:.1f} |" in proc.stdout
    assert set(report["bf16_autocast_over_float32"]) == {"odconv", "static"}
    if HAS_CPU_EXTENSION:
        extension, reference = results[0], results[1]
        assert extension["backend"] == "extension" and reference["backend"] == "reference"
        assert report["extension_over_reference"] == pytest.approx(
            extension["images_per_s"] / reference["images_per_s"])


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="times the compiled CPU extension")
def test_ab_builds_smoke_run(tmp_path, capsys):
    import ab_builds
    path = tmp_path / "ab.json"
    ab_builds.main([REPO, REPO, "--shapes", "2,4,6,6,3,2,1,1", "--rounds", "1", "--repeats", "1", "--json", str(path)])
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    (row,) = report["results"]
    assert row["name"] == "B2 4->6 6x6 k3 K2 s1 g1" and row["name"] in table
    for side in ("before_ms", "after_ms"):
        assert set(row[side]) == {"fwd", "bwd"} and all(ms > 0 for ms in row[side].values())


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="times the compiled CPU extension")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--paired pins the two builds to two CPUs")
def test_ab_builds_paired_run(tmp_path, capsys):
    import ab_builds
    path = tmp_path / "ab.json"
    ab_builds.main([REPO, REPO, "--shapes", "2,4,6,6,3,2,1,1", "--rounds", "2", "--repeats", "1", "--paired",
                    "--threads", "2", "--json", str(path)])
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["paired"] and report["threads"] == 2
    (row,) = report["results"]
    assert row["name"] in table and "[" in table  # the ratios' range
    for op in ("fwd", "bwd"):
        assert len(row["ratios"][op]) == 2 and all(r > 0 for r in row["ratios"][op])
        assert row["before_ms"][op] > 0 and row["after_ms"][op] > 0


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="times the compiled CPU extension")
def test_ab_builds_env_reaches_one_side_only(tmp_path, capsys):
    import ab_builds
    common = [REPO, REPO, "--shapes", "2,4,6,6,3,2,1,1", "--rounds", "1", "--repeats", "1"]
    # an override the op rejects stops B's process (A's, without it, ran first and passed)
    with pytest.raises(SystemExit, match="ODCONV_CPU_CONV_PATH must be auto, always or never, got 'bad'"):
        ab_builds.main(common + ["--env-b", "ODCONV_CPU_CONV_PATH=bad"])
    path = tmp_path / "ab.json"
    ab_builds.main(common + ["--env-b", "ODCONV_CPU_TRANSPOSED_FORWARD=never", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["env_a"] == {} and report["env_b"] == {"ODCONV_CPU_TRANSPOSED_FORWARD": "never"}
    with pytest.raises(SystemExit):
        ab_builds.main(common + ["--env-a", "NO_EQUALS_SIGN"])
    assert "VAR=VALUE, got 'NO_EQUALS_SIGN'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="times the compiled CPU extension")
def test_ab_env_fresh_inputs_gives_every_round_new_tensors(tmp_path, monkeypatch):
    import ab_env
    real_layer_calls = ab_env.layer_calls
    inputs, alive = [], []  # weak references to each set's x; whether every earlier x lived at each call

    def watched_layer_calls(shape):
        calls = real_layer_calls(shape)
        fwd = calls["fwd"]
        x = next(c.cell_contents for c in fwd.__closure__ if isinstance(c.cell_contents, torch.Tensor))
        inputs.append(weakref.ref(x))
        del x

        def op():
            alive.append(all(ref() is not None for ref in inputs))
            return fwd()
        return dict(calls, fwd=op)

    monkeypatch.setattr(ab_env, "layer_calls", watched_layer_calls)
    path = tmp_path / "ab_env.json"
    ab_env.main(["--variants", "-", "ODCONV_CPU_FORWARD_SPLIT=samples", "--shapes", "2,4,6,6,3,2,1,1", "--modes", "fwd",
                 "--rounds", "3", "--warmup", "0", "--fresh-inputs", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["fresh_inputs"] is True and len(report["results"][0]["variants"]["-"]["times_ms"]) == 3
    assert len(inputs) == 1 + 3  # the shape's calls, then one set per round
    assert alive and all(alive)  # the earlier rounds' inputs were kept: each round's memory is new
    inputs.clear()
    ab_env.main(["--variants", "-", "ODCONV_CPU_FORWARD_SPLIT=samples", "--shapes", "2,4,6,6,3,2,1,1", "--modes", "fwd",
                 "--rounds", "3", "--warmup", "0", "--json", str(path)])
    assert len(inputs) == 1 and json.loads(path.read_text())["fresh_inputs"] is False


def test_ab_env_alternates_variants_in_one_process(tmp_path, capsys, monkeypatch):
    import ab_env
    monkeypatch.delenv("ODCONV_CPU_BACKWARD_SPLIT", raising=False)
    monkeypatch.setenv("ODCONV_CPU_TRANSPOSED_FORWARD", "never")
    path = tmp_path / "ab_env.json"
    variants = ["-", "ODCONV_CPU_BACKWARD_SPLIT=samples,ODCONV_CPU_TRANSPOSED_FORWARD="]
    ab_env.main(["--variants", *variants, "--shapes", "2,4,6,6,3,2,1,1", "--rounds", "3", "--warmup", "1",
                 "--json", str(path)])
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    assert [(row["name"], row["op"]) for row in report["results"]] == [("B2 4->6 6x6 k3 K2 s1 g1", "fwd"),
                                                                       ("B2 4->6 6x6 k3 K2 s1 g1", "bwd")]
    for row in report["results"]:
        first, second = (row["variants"][v] for v in variants)
        assert first["ratios"] == [1.0] * 3 and len(second["ratios"]) == 3 and all(r > 0 for r in second["ratios"])
        assert row["name"] in table and first["median_ms"] > 0
    # the environment is as it was: set, unset
    assert os.environ["ODCONV_CPU_TRANSPOSED_FORWARD"] == "never" and "ODCONV_CPU_BACKWARD_SPLIT" not in os.environ
    assert report["keep_freed_memory"] is False  # glibc's defaults unless asked
    calls = []  # --keep-freed-memory asks odconv (a stand-in here: the setting is process-wide)
    monkeypatch.setattr(ab_env.odconv, "keep_freed_memory", lambda: calls.append(True) or True)
    ab_env.main(["--variants", "-", "ODCONV_CPU_FORWARD_SPLIT=samples", "--shapes", "2,4,6,6,3,2,1,1", "--modes", "fwd",
                 "--rounds", "1",
                 "--warmup", "0", "--keep-freed-memory", "--json", str(path)])
    assert calls == [True] and json.loads(path.read_text())["keep_freed_memory"] is True
    # the op reads a variant's override at the call: a value it rejects fails there, and is undone
    with pytest.raises(RuntimeError, match="ODCONV_CPU_BACKWARD_SPLIT must be auto, samples or columns, got 'bad'"):
        ab_env.main(["--variants", "-", "ODCONV_CPU_BACKWARD_SPLIT=bad", "--shapes", "2,4,6,6,3,2,1,1",
                     "--modes", "bwd", "--rounds", "1", "--warmup", "1"])
    assert "ODCONV_CPU_BACKWARD_SPLIT" not in os.environ
    with pytest.raises(SystemExit):
        ab_env.main(["--variants", "-", "NO_EQUALS_SIGN"])
    assert "VAR=VALUE[,VAR=VALUE...], got 'NO_EQUALS_SIGN'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="times the compiled CPU extension")
def test_sweep_shapes_smoke_run(tmp_path):
    # a subprocess: the script makes glibc keep freed memory, a process-wide setting
    path = tmp_path / "sweep.json"
    command = [sys.executable, os.path.join(BENCHMARKS, "sweep_shapes.py"), "--count", "3", "--calls", "1",
               "--seed", "5", "--min-macs", "1e5", "--max-macs", "3e6", "--flag", "0", "--dilations", "1,3",
               "--json", str(path)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(path.read_text())
    assert len(report["results"]) == 3 and report["args"]["seed"] == 5
    import random
    import sweep_shapes
    rng = random.Random(5)
    for row in report["results"]:
        shape = LayerShape(**{k: row["shape"][k] for k in ("batch", "in_channels", "out_channels", "size", "kernel",
                                                           "kernel_num", "stride", "groups", "dilation")})
        assert shape == sweep_shapes.draw(rng, 1e5, 3e6, (1, 3))  # the seed gives the same layers
        macs = shape.batch * shape.out_channels * shape.in_channels // shape.groups * shape.kernel ** 2 * \
            shape.out_size ** 2
        assert 1e5 <= macs <= 3e6
        ms = row["median_ms"]
        assert row["fwd_over_floor"] == pytest.approx(ms["fwd"] / ms["static_fwd"] / shape.floor)
        assert row["fwdbwd_over_floor"] == pytest.approx(
            (ms["fwd"] + ms["bwd"]) / (ms["static_fwd"] + ms["static_bwd"]) / shape.floor)
        assert row["flagged"] and row["name"] in proc.stdout  # --flag 0 marks every layer
    assert "3 of 3 layers above 0.0" in proc.stdout


def test_sweep_shapes_dilations():
    import random
    import sweep_shapes
    # the default draws no dilation, so a seed's layers are those it gave before --dilations existed
    assert sweep_shapes.draw(random.Random(0), 2e7, 4e9) == LayerShape(8, 160, 96, 56, 3, 4, 1, 2)  # seed 0 in RESULTS
    drawn = [sweep_shapes.draw(random.Random(seed), 2e7, 4e9, (2, 6)) for seed in range(20)]
    assert {s.dilation for s in drawn} == {2, 6} and all(s.out_size >= 1 for s in drawn)
    for bad in ("0", "1,x", ""):
        with pytest.raises(SystemExit):
            sweep_shapes.main(["--dilations", bad])


@pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="probes the compiled CPU extension")
def test_cpu_error_probe_passes():
    proc = subprocess.run([sys.executable, "-X", "faulthandler", os.path.join(BENCHMARKS, "cpu_error_probe.py")],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "must be at least as large as the dilated kernel" in proc.stdout
    assert proc.stdout.rstrip().endswith("all steps passed")


def test_gpu_check_plumbing_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh with only its info step: the script parses, skips what is not selected,
    and writes a summary naming every step; the steps themselves need a GPU machine."""
    script = os.path.join(BENCHMARKS, "gpu_check.sh")
    steps = re.search(r"^STEPS=\(([^)]*)\)", open(script).read(), re.M).group(1).split()
    assert {"build", "test_cuda", "test_ops", "bench"} <= set(steps), steps
    env = dict(os.environ, GPU_CHECK_STEPS="info", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", script], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^info\s+PASS", summary, re.M), summary
    for step in steps[1:]:
        assert re.search(rf"^{step}\s+SKIP", summary, re.M), (step, summary)
    assert summary.rstrip().endswith("RESULT: PASS"), summary
    assert "python" in (tmp_path / "info.log").read_text()
