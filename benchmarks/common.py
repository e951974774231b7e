"""Helpers shared by the benchmark scripts: layer shapes and suites, inputs, accuracy checks, memory
probes and machine information. No timing here: the scripts time with torch.utils.benchmark.
"""
import ctypes
import dataclasses
import datetime
import os
import platform
import subprocess

import torch
import torch.nn.functional as F

NAMES = ("x", "weight", "channel_att", "filter_att", "spatial_att", "kernel_att")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One ODConv layer: square maps and kernels, padding dilation*(k//2) unless `pad` says otherwise."""
    batch: int
    in_channels: int
    out_channels: int
    size: int          # H = W
    kernel: int        # kh = kw
    kernel_num: int    # K, the number of candidate kernels
    stride: int = 1
    groups: int = 1
    pad: int = -1      # padding; -1: k//2. A static convolution skips the taps that fall in the padding
    #                    (oneDNN's direct kernels), an im2col product multiplies their zeros: padding 0
    #                    on a larger input gives the same output with every tap inside the map.
    dilation: int = 1

    @property
    def default_padding(self):
        return self.dilation * (self.kernel // 2)

    @property
    def padding(self):
        return self.default_padding if self.pad < 0 else self.pad

    @property
    def out_size(self):
        return (self.size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    @property
    def floor(self):
        """Best possible cost relative to a static conv of the same shape, 1 + K/(Ho*Wo).

        Per sample, the conv costs Cout*J*Ho*Wo multiply-adds (J = Cin/G*kh*kw) and aggregating the
        sample's kernel from the K candidates costs K*Cout*J more; both directions have this ratio.
        """
        return 1.0 + self.kernel_num / self.out_size ** 2

    @property
    def name(self):
        padding = f" p{self.padding}" if self.padding != self.default_padding else ""
        dilation = f" d{self.dilation}" if self.dilation != 1 else ""
        return (f"B{self.batch} {self.in_channels}->{self.out_channels} {self.size}x{self.size} "
                f"k{self.kernel} K{self.kernel_num} s{self.stride} g{self.groups}{padding}{dilation}")

    def conv_args(self):
        """(stride, padding, dilation, groups) as pairs, the way F.conv2d and the reference take them."""
        return (self.stride, self.stride), (self.padding, self.padding), (self.dilation, self.dilation), self.groups

    def with_batch(self, batch):
        return dataclasses.replace(self, batch=batch)

    def as_dict(self):
        return dict(dataclasses.asdict(self), padding=self.padding, out_size=self.out_size, floor=self.floor)


# (B, Cin, Cout, H, k, K, stride, groups)
SUITES = {
    # Smoke run: one tiny layer (stride 2, Cin != Cout), so that --quick stays under a minute on 2 cores
    # even when torch.compile starts with a cold cache.
    "quick": [
        LayerShape(4, 32, 64, 16, 3, 4, 2, 1),
    ],
    "default": [
        LayerShape(64, 64, 64, 32, 3, 4, 1, 1),
        LayerShape(64, 128, 128, 16, 3, 4, 1, 1),
        LayerShape(32, 256, 256, 8, 3, 4, 1, 1),
        LayerShape(128, 32, 32, 48, 3, 4, 1, 1),
        LayerShape(64, 128, 128, 16, 1, 4, 1, 1),     # pointwise
        LayerShape(64, 128, 128, 16, 3, 4, 1, 128),   # depthwise
        LayerShape(64, 64, 128, 32, 3, 4, 2, 1),      # strided, channel doubling
    ],
    # ResNet-18 layer4: 7x7 maps, where the K/(Ho*Wo) aggregation overhead is largest.
    "layer4": [
        LayerShape(32, 512, 512, 7, 3, 4, 1, 1),
        LayerShape(256, 512, 512, 7, 3, 4, 1, 1),
    ],
    # The ODConv layers of the GTSRB network (odconv/models.py) at train.py's batch and 48x48 input.
    "gtsrb": [
        LayerShape(128, 32, 32, 48, 3, 4, 1, 1),
        LayerShape(128, 32, 64, 24, 3, 4, 1, 1),
        LayerShape(128, 64, 64, 24, 3, 4, 1, 1),
        LayerShape(128, 64, 128, 12, 3, 4, 1, 1),
        LayerShape(128, 128, 128, 12, 3, 4, 1, 1),
        LayerShape(128, 128, 256, 6, 3, 4, 1, 1),
    ],
    "extra": [
        LayerShape(64, 512, 512, 4, 3, 4, 1, 1),      # deep, tiny map
        LayerShape(32, 3, 32, 64, 3, 4, 1, 1),        # stem-like, 3 input channels
        LayerShape(64, 96, 96, 24, 5, 4, 1, 1),       # 5x5 kernel
        LayerShape(16, 64, 64, 56, 3, 4, 2, 1),       # large map, strided
        LayerShape(128, 32, 64, 32, 3, 2, 1, 2),      # K = 2, groups = 2
    ],
    # Layers beyond the ones the speed issue lists, as a user would build them (the targets hold for
    # "other reasonable shapes" too): ResNet stages and their downsampling, batch 1, K = 1 and 8,
    # odd sizes, a small strided layer, groups of 24 channels, a 1x1 downsampling projection.
    "other": [
        LayerShape(32, 64, 64, 56, 3, 4, 1, 1),       # ResNet layer1
        LayerShape(32, 128, 128, 28, 3, 4, 1, 1),     # ResNet layer2
        LayerShape(32, 256, 256, 14, 3, 4, 1, 1),     # ResNet layer3
        LayerShape(8, 64, 64, 56, 3, 4, 1, 1),        # small batch, large map
        LayerShape(1, 64, 64, 32, 3, 4, 1, 1),        # batch 1
        LayerShape(64, 32, 64, 24, 3, 8, 1, 1),       # K = 8
        LayerShape(16, 48, 96, 20, 3, 4, 2, 1),       # small strided layer, 10x10 out
        LayerShape(64, 16, 16, 64, 3, 4, 1, 1),       # few channels, large map
        LayerShape(32, 256, 512, 14, 3, 4, 2, 1),     # ResNet layer4 downsampling, 7x7 out
        LayerShape(32, 96, 96, 16, 3, 4, 1, 4),       # 4 groups of 24 channels
        LayerShape(64, 64, 64, 32, 3, 1, 1, 1),       # K = 1
        LayerShape(64, 63, 65, 31, 3, 4, 1, 1),       # odd channels and map
        LayerShape(32, 128, 256, 28, 1, 4, 2, 1),     # 1x1 stride-2 projection
        LayerShape(64, 128, 128, 12, 3, 4, 1, 1),     # 12x12 map
    ],
    # MobileNetV2, the ODConv paper's other backbone, whose official model makes every convolution of
    # its inverted residual blocks an ODConv: depthwise 3x3 layers from 112x112 down to 7x7 (one
    # strided), and the 1x1 expansions and projections around them, at batch 32 and 224x224 input.
    "mobilenetv2": [
        LayerShape(32, 32, 32, 112, 3, 4, 1, 32),     # first block's depthwise, 112x112
        LayerShape(32, 96, 96, 112, 3, 4, 2, 96),     # strided depthwise, 112x112 -> 56x56
        LayerShape(32, 24, 144, 56, 1, 4, 1, 1),      # expansion, 56x56
        LayerShape(32, 144, 144, 56, 3, 4, 1, 144),   # depthwise, 56x56
        LayerShape(32, 144, 24, 56, 1, 4, 1, 1),      # projection, 56x56
        LayerShape(32, 384, 384, 14, 3, 4, 1, 384),   # depthwise, 14x14
        LayerShape(32, 160, 960, 7, 1, 4, 1, 1),      # expansion, 7x7
        LayerShape(32, 960, 960, 7, 3, 4, 1, 960),    # depthwise, 7x7
        LayerShape(32, 960, 160, 7, 1, 4, 1, 1),      # projection, 7x7
    ],
    # ResNet-50's bottleneck 1x1 layers (its 3x3 layers are those of `other` and layer4), at batch 32 and
    # 224x224 input: per stage the reduction and the expansion, the first block's 64->64, and the
    # strided 1x1 projections that open layer3 and layer4.
    "resnet50": [
        LayerShape(32, 64, 64, 56, 1, 4, 1, 1),       # layer1, first block's reduction
        LayerShape(32, 256, 64, 56, 1, 4, 1, 1),      # layer1 reduction
        LayerShape(32, 64, 256, 56, 1, 4, 1, 1),      # layer1 expansion
        LayerShape(32, 512, 128, 28, 1, 4, 1, 1),     # layer2 reduction
        LayerShape(32, 128, 512, 28, 1, 4, 1, 1),     # layer2 expansion
        LayerShape(32, 512, 1024, 28, 1, 4, 2, 1),    # layer3 projection, stride 2
        LayerShape(32, 1024, 256, 14, 1, 4, 1, 1),    # layer3 reduction
        LayerShape(32, 256, 1024, 14, 1, 4, 1, 1),    # layer3 expansion
        LayerShape(32, 1024, 2048, 14, 1, 4, 2, 1),   # layer4 projection, stride 2
        LayerShape(32, 2048, 512, 7, 1, 4, 1, 1),     # layer4 reduction
        LayerShape(32, 512, 2048, 7, 1, 4, 1, 1),     # layer4 expansion
    ],
    # ConvNeXt-T's layers at batch 32 and 224x224 input, with ODConv in place of every convolution: the 4x4
    # stride-4 stem, the 7x7 depthwise layer of each stage (56x56 to 7x7), the MLP's 1x1 expansion and
    # projection on the first and last stage's maps, and a 2x2 stride-2 downsampling layer.
    "convnext": [
        LayerShape(32, 3, 96, 224, 4, 4, 4, 1, 0),     # stem, 4x4 stride 4
        LayerShape(32, 96, 96, 56, 7, 4, 1, 96),       # stage 1 depthwise 7x7
        LayerShape(32, 96, 384, 56, 1, 4, 1, 1),       # stage 1 MLP expansion
        LayerShape(32, 384, 96, 56, 1, 4, 1, 1),       # stage 1 MLP projection
        LayerShape(32, 96, 192, 56, 2, 4, 2, 1, 0),    # downsampling, 2x2 stride 2
        LayerShape(32, 192, 192, 28, 7, 4, 1, 192),    # stage 2 depthwise 7x7
        LayerShape(32, 384, 384, 14, 7, 4, 1, 384),    # stage 3 depthwise 7x7
        LayerShape(32, 768, 768, 7, 7, 4, 1, 768),     # stage 4 depthwise 7x7
        LayerShape(32, 768, 3072, 7, 1, 4, 1, 1),      # stage 4 MLP expansion
        LayerShape(32, 3072, 768, 7, 1, 4, 1, 1),      # stage 4 MLP projection
    ],
    # ResNeXt-50 (32x4d)'s grouped 3x3 layers, 32 groups of 4 to 32 channels, at batch 32 and 224x224 input:
    # per stage the stride-1 layer and the strided one that opens it (layer1 has none).
    "resnext50": [
        LayerShape(32, 128, 128, 56, 3, 4, 1, 32),    # layer1
        LayerShape(32, 256, 256, 56, 3, 4, 2, 32),    # layer2 downsampling, 28x28 out
        LayerShape(32, 256, 256, 28, 3, 4, 1, 32),    # layer2
        LayerShape(32, 512, 512, 28, 3, 4, 2, 32),    # layer3 downsampling, 14x14 out
        LayerShape(32, 512, 512, 14, 3, 4, 1, 32),    # layer3
        LayerShape(32, 1024, 1024, 14, 3, 4, 2, 32),  # layer4 downsampling, 7x7 out
        LayerShape(32, 1024, 1024, 7, 3, 4, 1, 32),   # layer4
    ],
}


def env_settings(items):
    """{"VAR": "VALUE"} of VAR=VALUE items (ab_builds.py's --env-a/--env-b, ab_env.py's variants);
    ValueError naming the first item that is not one."""
    settings = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(item)
        settings[name] = value
    return settings


def parse_shapes(spec):
    """Suite names and/or custom shapes: "default,layer4" or "B,Cin,Cout,H,k,K,stride,groups[,padding[,dilation]];..."
    (mixable with ';', e.g. "layer4;32,256,256,8,3,4,1,1"; padding -1 or left out: dilation*(k//2))."""
    shapes = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        tokens = [t.strip() for t in part.split(",") if t.strip()]
        if all(t.lstrip("-").isdigit() for t in tokens):
            if len(tokens) not in (8, 9, 10):
                raise ValueError(f"custom shape {part!r}: expected 8 to 10 integers B,Cin,Cout,H,k,K,stride,groups"
                                 f"[,padding[,dilation]]")
            values = list(map(int, tokens))
            shape = LayerShape(*values)
            if (min(values[:8] + values[9:]) < 1 or shape.pad < -1
                    or shape.in_channels % shape.groups or shape.out_channels % shape.groups):
                raise ValueError(f"custom shape {part!r}: sizes and dilation must be >= 1, padding >= 0 (or -1) and "
                                 f"groups must divide Cin and Cout")
            if shape.out_size < 1:
                raise ValueError(f"custom shape {part!r}: padding {shape.padding} leaves no output pixel")
            shapes.append(shape)
            continue
        for name in tokens:
            if name not in SUITES:
                raise ValueError(f"unknown shape suite {name!r}; known: {', '.join(SUITES)}")
            shapes.extend(SUITES[name])
    if not shapes:
        raise ValueError(f"no shapes in {spec!r}")
    return shapes


def make_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """The six odconv2d tensors as leaves: x, weight (K, Cout, Cin/G, k, k) with a Kaiming-like scale, and
    realistic attentions (sigmoid of random logits; softmax over the K kernels)."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(*size, generator=gen, dtype=torch.float64)  # noqa: E731
    b, k = shape.batch, shape.kernel
    fan_in = shape.in_channels // shape.groups * k * k
    tensors = [
        randn(b, shape.in_channels, shape.size, shape.size),
        randn(shape.kernel_num, shape.out_channels, shape.in_channels // shape.groups, k, k) * (2.0 / fan_in) ** 0.5,
        torch.sigmoid(randn(b, shape.in_channels)),
        torch.sigmoid(randn(b, shape.out_channels)),
        torch.sigmoid(randn(b, k, k)),
        torch.softmax(randn(b, shape.kernel_num), dim=1),
    ]
    # Generated in float64 on the CPU so every dtype and device sees the same values.
    return [t.to(device=device, dtype=dtype) for t in tensors]


def layer_calls(shape):
    """The float32 calls the workers of ab_builds.py and perf_shares.py time, on make_inputs(shape):
    "fwd" (the odconv2d op), "bwd" (odconv2d_backward, both gradient groups), "static_fwd" (F.conv2d
    with the first of the K kernels) and "static_bwd" (aten's convolution_backward of that). The odconv
    ops need `import odconv` first."""
    x, w, ch, f, s, a = [t.float().detach() for t in make_inputs(shape)]
    stride, padding, dilation, groups = shape.conv_args()
    args = (list(stride), list(padding), list(dilation), groups)
    w0 = w[0].contiguous()
    gy = torch.randn_like(F.conv2d(x, w0, None, stride, padding, dilation, groups))
    return {"fwd": lambda: torch.ops.odconv.odconv2d(x, w, ch, f, s, a, *args),
            "bwd": lambda: torch.ops.odconv.odconv2d_backward(gy, x, w, ch, f, s, a, *args, [True, True]),
            "static_fwd": lambda: F.conv2d(x, w0, None, stride, padding, dilation, groups),
            "static_bwd": lambda: torch.ops.aten.convolution_backward(gy, x, w0, None, stride, padding, dilation,
                                                                       False, [0, 0], groups, [True, True, False])}


def odconv2d_per_sample(x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding, dilation, groups):
    """odconv2d from its definition: each sample's kernel built explicitly, then one F.conv2d per sample.

    Slow and independent of odconv.reference (which attends to the feature maps and convolves the whole
    batch at once), so it can check the reference itself.
    """
    out_per_group = weight.shape[1] // groups
    outs = []
    for b in range(x.shape[0]):
        kernel = (kernel_att[b][:, None, None, None, None] * weight).sum(0)
        # input channel c of the kernel row o is channel (o // out_per_group) * Cin/G + c of x
        channel = channel_att[b].view(groups, -1).repeat_interleave(out_per_group, dim=0)
        kernel = kernel * filter_att[b][:, None, None, None] * channel[:, :, None, None] * spatial_att[b]
        outs.append(F.conv2d(x[b:b + 1], kernel, None, stride, padding, dilation, groups))
    return torch.cat(outs)


def relative_errors(got, want):
    """max |got - want| / max |want| for each pair of tensors (inf for a missing or misshapen one).

    Relative to the tensor's largest magnitude rather than elementwise: gradients are long sums whose
    small entries come from cancellation, and there elementwise relative error means nothing.
    """
    errors = []
    for g, w in zip(got, want):
        if g is None or tuple(g.shape) != tuple(w.shape):
            errors.append(float("inf"))
            continue
        w = w.detach().double()
        scale = w.abs().max().item() if w.numel() else 0.0
        diff = (g.detach().double() - w).abs().max().item() if w.numel() else 0.0
        errors.append(diff / scale if scale > 0 else diff)
    return errors


# --------------------------------------------------------------------------------------------------
# CPU memory: peak resident set size of the current process (Linux).

def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_heap():
    """Give free glibc heap pages back to the OS so that RSS counts only live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); returns the current RSS
    in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss():
    """Peak RSS (VmHWM) in bytes since the last reset_peak_rss()."""
    return _proc_status_kib("VmHWM") * 1024


# Child processes that measure CPU memory get these, so glibc returns every buffer of 64 KiB or more to
# the OS when it is freed (fixed mmap threshold; by default glibc raises it up to 32 MiB after large
# frees, and memory kept in its heap would hide part of the next peak).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


# --------------------------------------------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "git_revision": _git_revision(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        # A busy machine makes timings noisy: the load at the start is recorded to tell.
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    device_capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        info["device_name"] = info["cpu_model"]
    return info
