"""The odconv2d operator: argument checks, backend choice, and the torch.library registrations.

This is the only module that knows about the compiled extension (odconv._C). Importing it loads the
extension if it was built, which registers ``torch.ops.odconv.odconv2d`` and
``torch.ops.odconv.odconv2d_backward`` with their CPU (and CUDA) kernels; the shape-only (fake)
kernels and the autograd formula are registered here, so autograd and torch.compile see one op.

Backend choice, per device type: the extension if it has a kernel for that device, else the
pure-PyTorch reference (odconv/reference.py). ``ODCONV_BACKEND=reference`` forces the reference,
``ODCONV_BACKEND=extension`` makes a missing extension an error (read once, at import). ``backend_info()`` tells which
backend serves CPU and CUDA, and why.
"""
import os

import torch

from .reference import odconv2d_reference

__all__ = ["odconv2d", "backend_info"]

_BACKEND_ENV = "ODCONV_BACKEND"
_CHOICES = ("auto", "extension", "reference")


def _build_info():
    import json
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _cpu_flags():
    """This CPU's feature flags as /proc/cpuinfo lists them; None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _missing_cpu_features(build, cpu_flags):
    """The instruction-set features the build was compiled for (setup.py records them) that this CPU
    lacks: code built with -march=native on one machine dies with an illegal instruction on an older
    one. Empty when either side is unknown."""
    required = build.get("required_cpu_features")
    if not required or cpu_flags is None:
        return []
    return [feature for feature in required if feature not in cpu_flags]


def _load_extension(build, cpu_flags):
    missing = _missing_cpu_features(build, cpu_flags)
    if missing:
        return None, (f"extension built for a CPU with {', '.join(missing)} (compiler flags "
                      f"{' '.join(build.get('cpu_arch_flags') or [])!r}), which this CPU lacks: rebuild it here "
                      "(pip install --no-build-isolation -e .), or build with ODCONV_CPU_ARCH naming the oldest "
                      "target CPU")
    try:
        from . import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY registrations)
    except Exception as error:  # not built, or built against another torch
        return None, f"extension not built or not loadable: {type(error).__name__}: {error}"
    return _C, None


_BUILD = _build_info()  # what setup.py recorded about the extension this process loads (or not)
_C, _LOAD_ERROR = _load_extension(_BUILD, _cpu_flags())


def _kernel_registered(dispatch_key):
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key("odconv::odconv2d", dispatch_key)


def _requested_backend():
    choice = os.environ.get(_BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{_BACKEND_ENV} must be one of {_CHOICES}, got {choice!r}")
    return choice


# Decided once at import: the dispatch below is then plain Python that torch.compile traces
# without graph breaks.
_REQUESTED = _requested_backend()
_HAS_KERNEL = {"cpu": _kernel_registered("CPU"), "cuda": _kernel_registered("CUDA")}


def _uses_extension(device_type):
    if _REQUESTED == "reference" or device_type not in _HAS_KERNEL:
        return False
    if _HAS_KERNEL[device_type]:
        return True
    if _REQUESTED == "extension":
        raise RuntimeError(f"{_BACKEND_ENV}=extension but the extension has no {device_type} kernel: "
                           f"{backend_info()[device_type]['reason']}")
    return False


def backend_info():
    """Which implementation serves odconv2d on each device type, and why.

    Returns ``{"cpu": {"backend": ..., "reason": ...}, "cuda": {...}, "requested": ...,
    "build": {...}}``; backend is "extension" or "reference".
    """
    choice = _REQUESTED
    build = dict(_BUILD)
    info = {"requested": choice, "build": build}
    for device_type in ("cpu", "cuda"):
        if choice == "reference":
            entry = ("reference", f"{_BACKEND_ENV}=reference")
        elif _C is None:
            entry = ("reference", _LOAD_ERROR)
        elif _HAS_KERNEL[device_type]:
            entry = ("extension", f"compiled {device_type.upper()} kernel registered")
        else:
            why = build.get("cuda_skipped_because") if device_type == "cuda" else None
            entry = ("reference", f"extension built without {device_type.upper()} kernels"
                     + (f": {why}" if why else ""))
        info[device_type] = {"backend": entry[0], "reason": entry[1]}
    return info


def _pair(value, name, minimum):
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, tuple, list)):
        raise TypeError(f"odconv2d: {name} must be an int or a pair of ints, got {value!r}")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"odconv2d: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"odconv2d: {name} must be >= {minimum} in both dimensions, got {value!r}")
    return pair


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _check(x, weight, channel_att, filter_att, spatial_att, kernel_att, groups):
    """The argument checks of the C++ kernels, in Python, so both backends fail the same way."""
    for name, t in (("x", x), ("weight", weight), ("channel_att", channel_att), ("filter_att", filter_att),
                    ("spatial_att", spatial_att), ("kernel_att", kernel_att)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"odconv2d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"odconv2d: x must be a 4-D tensor (B, Cin, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError("odconv2d: weight must be a 5-D tensor (K, Cout, Cin/groups, kh, kw), "
                         f"got {weight.dim()}-D with shape {tuple(weight.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"odconv2d: x must have a floating-point dtype, got {x.dtype}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"odconv2d: groups must be an int >= 1, got {groups!r}")
    batch, in_channels = x.shape[0], x.shape[1]
    kernel_num, out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    if in_channels % groups:
        raise ValueError(f"odconv2d: groups ({groups}) must divide the input channels of x, got Cin = {in_channels}")
    if out_channels % groups:
        raise ValueError(f"odconv2d: groups ({groups}) must divide the output channels of weight, got Cout = {out_channels}")
    if in_per_group != in_channels // groups:
        raise ValueError(f"odconv2d: weight.size(2) must be Cin/groups = {in_channels}/{groups} = "
                         f"{in_channels // groups}, got {in_per_group} (weight shape {tuple(weight.shape)})")
    expected = {
        "channel_att": ((batch, in_channels), "(B, Cin)", channel_att),
        "filter_att": ((batch, out_channels), "(B, Cout)", filter_att),
        "spatial_att": ((batch, kernel_h, kernel_w), "(B, kh, kw)", spatial_att),
        "kernel_att": ((batch, kernel_num), "(B, K)", kernel_att),
    }
    for name, (shape, names, t) in expected.items():
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"odconv2d: {name} must have shape {names} = {tuple(shape)}, got {tuple(t.shape)}")
    for name, t in [("weight", weight)] + [(n, e[2]) for n, e in expected.items()]:
        # Under autocast mixed floating dtypes are expected: autocast casts them (the op's Autocast
        # kernels, csrc/odconv_autocast.cpp; PyTorch's ops for the reference).
        if t.dtype != x.dtype and not _autocast_enabled(x.device.type):
            raise TypeError(f"odconv2d: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"odconv2d: {name} must be on the device of x ({x.device}), got {t.device}")


def odconv2d(x, weight, channel_att, filter_att, spatial_att, kernel_att,
             stride=1, padding=0, dilation=1, groups=1):
    """Omni-dimensional dynamic convolution.

    Per sample b, a convolution of ``x[b]`` with the kernel
    ``W_b[o,c,u,v] = filter_att[b,o] * channel_att[b,c] * spatial_att[b,u,v] * sum_k kernel_att[b,k] * weight[k,o,c,u,v]``.

    Args:
        x: (B, Cin, H, W).
        weight: (K, Cout, Cin/groups, kh, kw), the K candidate kernels.
        channel_att: (B, Cin). filter_att: (B, Cout). spatial_att: (B, kh, kw). kernel_att: (B, K).
        stride, padding, dilation: int or (height, width) pair, as in ``F.conv2d``.
        groups: as in ``F.conv2d``.

    Returns:
        (B, Cout, Ho, Wo), with the gradients of all six tensor arguments.
    """
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    _check(x, weight, channel_att, filter_att, spatial_att, kernel_att, groups)
    if _uses_extension(x.device.type):
        return torch.ops.odconv.odconv2d(x, weight, channel_att, filter_att, spatial_att, kernel_att,
                                         list(stride), list(padding), list(dilation), groups)
    return odconv2d_reference(x, weight, channel_att, filter_att, spatial_att, kernel_att,
                              stride, padding, dilation, groups)


def _output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _register():
    """Fake kernels and autograd for the extension's ops (only when the extension is loaded)."""

    @torch.library.register_fake("odconv::odconv2d")
    def _odconv2d_fake(x, weight, channel_att, filter_att, spatial_att, kernel_att,
                       stride, padding, dilation, groups):
        torch._check(x.dim() == 4, lambda: "odconv2d: x must be 4-D")
        torch._check(weight.dim() == 5, lambda: "odconv2d: weight must be 5-D")
        out_h = _output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0])
        out_w = _output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1])
        return x.new_empty((x.shape[0], weight.shape[1], out_h, out_w))

    @torch.library.register_fake("odconv::odconv2d_backward")
    def _odconv2d_backward_fake(grad_out, x, weight, channel_att, filter_att, spatial_att, kernel_att,
                                stride, padding, dilation, groups, output_mask):
        return (x.new_empty(x.shape), weight.new_empty(weight.shape), channel_att.new_empty(channel_att.shape),
                filter_att.new_empty(filter_att.shape), spatial_att.new_empty(spatial_att.shape),
                kernel_att.new_empty(kernel_att.shape))

    def _setup_context(ctx, inputs, output):
        x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight, channel_att, filter_att, spatial_att, kernel_att)
        ctx.conv_args = (stride, padding, dilation, groups)

    def _backward(ctx, grad_out):
        needs = ctx.needs_input_grad
        output_mask = [bool(needs[0]), any(needs[1:6])]
        grads = torch.ops.odconv.odconv2d_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.conv_args,
                                                   output_mask)
        grads = [g if need else None for g, need in zip(grads, needs[:6])]
        return (*grads, None, None, None, None)

    torch.library.register_autograd("odconv::odconv2d", _backward, setup_context=_setup_context)


if _C is not None:
    _register()
