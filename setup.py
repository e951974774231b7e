"""Builds odconv._C, the C++ (and, where possible, CUDA) kernels of the odconv operators.

    pip install --no-build-isolation -e .

Uses the installed torch. The CUDA sources are compiled when torch is a CUDA build and a CUDA
toolkit (nvcc) is found; no GPU is needed for that. Environment variables:

    ODCONV_NO_CUDA=1            build the CPU kernels only
    ODCONV_CPU_ARCH             compiler flags for the target CPU, default "-march=native"; to run
                                the build on other machines, name the oldest CPU, e.g. "-march=x86-64-v3"
    ODCONV_REQUIRE_EXTENSION=1  fail the install when the extension does not build (CI sets it);
                                otherwise the package installs without it and runs the pure-PyTorch
                                reference, and odconv.backend_info() says why
    TORCH_CUDA_ARCH_LIST        CUDA architectures, default "9.0" (H100/H200)
    CUDA_HOME                   the CUDA toolkit root, found automatically otherwise
    MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import json
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "odconv", "_build_info.json")


def find_cuda_home():
    """The CUDA toolkit root: the first candidate holding nvcc, the runtime headers and libcudart.

    torch guesses CUDA_HOME from the nvcc on PATH, which is wrong when that nvcc is a wrapper
    script outside the toolkit (linking then fails on -lcudart), so check each candidate.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += ["/opt/cuda", "/usr"]
    for root in candidates:
        if not root:
            continue
        root = os.path.realpath(root)
        has_nvcc = os.path.isfile(os.path.join(root, "bin", "nvcc"))
        has_headers = os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))
        has_cudart = any(glob.glob(os.path.join(root, lib, "libcudart.so*"))
                         for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))
        if has_nvcc and has_headers and has_cudart:
            return root
    return None


# x86 instruction-set macros a compiler defines for its -march, and the /proc/cpuinfo flag of each.
# An extension compiled for a CPU with one of these may use its instructions anywhere.
ISA_MACROS = {
    "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__POPCNT__": "popcnt",
    "__LZCNT__": "abm", "__MOVBE__": "movbe", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BF16__": "avx512_bf16", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512FP16__": "avx512_fp16",
}


def required_cpu_features(arch_flags):
    """The CPU flags (as /proc/cpuinfo names them) that code compiled with arch_flags may need.

    Asks the compiler which instruction-set macros the flags define. None when it cannot tell.
    odconv/ops.py compares the list with the CPU it runs on before loading the extension, so a build
    copied to an older CPU falls back to the reference instead of dying on an illegal instruction.
    """
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    compiler = os.environ.get("CXX", "c++")
    try:
        macros = subprocess.run([compiler, *arch_flags, "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    defined = {line.split()[1] for line in macros.splitlines() if line.startswith("#define ")}
    return sorted(flag for macro, flag in ISA_MACROS.items() if macro in defined)


def build_config():
    import torch

    cuda_home = None
    reason = ""
    if os.environ.get("ODCONV_NO_CUDA") == "1":
        reason = "ODCONV_NO_CUDA=1"
    elif torch.version.cuda is None:
        reason = "torch is a CPU-only build"
    else:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            reason = "no CUDA toolkit (nvcc, cuda_runtime.h, libcudart) found; set CUDA_HOME"
    # The extension is compiled where it runs (pip install -e .), so let the element-wise loops of
    # the CPU kernels use the machine's vector width (AVX-512 here). ODCONV_CPU_ARCH="" disables.
    native = "-march=native" if platform.machine() in ("x86_64", "AMD64", "aarch64") else ""
    cpu_arch_flags = os.environ.get("ODCONV_CPU_ARCH", native).split()
    if cuda_home:
        # torch.utils.cpp_extension reads these when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": bool(cuda_home),
        "cuda_home": cuda_home,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda_home else None,
        "cuda_skipped_because": reason or None,
        "openmp": "OpenMP" in torch.__config__.parallel_info(),
        "cpu_arch_flags": cpu_arch_flags,
        "required_cpu_features": required_cpu_features(cpu_arch_flags),
        "python": sys.version.split()[0],
    }


def extensions(config):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = ["csrc/odconv.cpp", "csrc/odconv_autocast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    # the C++ standard is the one torch asks for (C++17 before 2.10, C++20 after)
    cxx = ["-O3"] + config["cpu_arch_flags"]
    link = []
    if config["openmp"]:
        # at::parallel_for is inline OpenMP code: without -fopenmp it would run serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if config["cuda"] and cuda_sources:
        return CUDAExtension(
            "odconv._C",
            cpu_sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DODCONV_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=link,
        ), CppExtension("odconv._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return CppExtension("odconv._C", cpu_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link), None


def main():
    config = build_config()
    from torch.utils.cpp_extension import BuildExtension

    ext, cpu_only_fallback = extensions(config)
    required = os.environ.get("ODCONV_REQUIRE_EXTENSION") == "1"
    print("odconv build configuration: " + json.dumps(config, indent=1), flush=True)

    class Build(BuildExtension):
        """Builds _C; if it fails, retries without CUDA, then (unless required) installs without it."""

        @staticmethod
        def compiler_in_use():
            """The C++ compiler torch's ninja build runs (CXX, else c++), its version, and CC (nvcc's host
            compiler when set).

            Recorded because it matters: on the H200 image the environment names a GCC in /opt/gcc, and
            an extension it builds crashes the process at the first C++ exception of the CPU kernel
            (benchmarks/results/gpu_2026-11-30_b/probe_flags.log); the system g++ works."""
            import shutil
            import subprocess

            from torch.utils.cpp_extension import get_cxx_compiler

            compiler = get_cxx_compiler()
            path = shutil.which(compiler) or compiler
            try:
                version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                         timeout=60).stdout.splitlines()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                version = None
            return {"path": os.path.realpath(path), "version": version, "CC": os.environ.get("CC")}

        def build_extension(self, extension):
            status = dict(config, built=True, error=None, cxx=self.compiler_in_use())
            print(f"odconv: C++ compiler {status['cxx']}", flush=True)
            try:
                super().build_extension(extension)
            except Exception as error:  # compiler missing, compile error, link error
                status.update(built=False, error=f"{type(error).__name__}: {error}")
                if cpu_only_fallback is not None and not required:
                    print(f"odconv: CUDA build failed ({error}); retrying CPU-only", flush=True)
                    try:
                        super().build_extension(cpu_only_fallback)
                        status.update(built=True, cuda=False, cuda_skipped_because=status["error"])
                    except Exception as cpu_error:
                        status["error"] = f"{type(cpu_error).__name__}: {cpu_error}"
                if required and not status["built"]:
                    raise
                if not status["built"]:
                    print(f"odconv: extension not built, the reference path will be used: {status['error']}", flush=True)
            with open(BUILD_INFO, "w") as f:
                json.dump(status, f, indent=1)

    setup(
        ext_modules=[ext],
        cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    )


main()
