"""Builds odconv._C, the C++ (and, where possible, CUDA) kernels of the odconv operators.

    pip install --no-build-isolation -e .

Uses the installed torch. The CUDA sources are compiled when torch is a CUDA build and a CUDA
toolkit (nvcc) is found; no GPU is needed for that. Environment variables:

    ODCONV_NO_CUDA=1            build the CPU kernels only
    ODCONV_CPU_ARCH             compiler flags for the target CPU, default "-march=native"
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
        "cpu_arch_default": "-march=native" if platform.machine() in ("x86_64", "AMD64", "aarch64") else "",
        "python": sys.version.split()[0],
    }


def extensions(config):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = ["csrc/odconv.cpp", "csrc/odconv_autocast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cxx = ["-O3"]  # the C++ standard is the one torch asks for (C++17 before 2.10, C++20 after)
    # The extension is compiled where it runs (pip install -e .), so let the element-wise loops of
    # the CPU kernels use the machine's vector width (AVX-512 here). ODCONV_CPU_ARCH="" disables.
    cxx += os.environ.get("ODCONV_CPU_ARCH", config["cpu_arch_default"]).split()
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

        def build_extension(self, extension):
            status = dict(config, built=True, error=None)
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
