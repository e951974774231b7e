"""Shared test helpers: a slow, independent oracle of the odconv2d function and random inputs."""
import os
import platform
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import odconv  # noqa: E402

HAS_CPU_EXTENSION = odconv.backend_info()["cpu"]["backend"] == "extension"
# where odconv.keep_freed_memory applies (glibc's mallopt on Linux)
GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
requires_extension = pytest.mark.skipif(not HAS_CPU_EXTENSION, reason="odconv CPU extension not built")


def odconv2d_oracle(x, weight, channel_att, filter_att, spatial_att, kernel_att, stride, padding, dilation, groups):
    """Each sample's kernel aggregated explicitly, then F.conv2d per sample: slow and obviously right."""
    kernel_num, out_channels, in_per_group, kh, kw = weight.shape
    out_per_group = out_channels // groups
    outs = []
    for b in range(x.shape[0]):
        kernel = torch.zeros_like(weight[0])
        for k in range(kernel_num):
            kernel = kernel + kernel_att[b, k] * weight[k]
        # input channel c of group g(o) = o // out_per_group is channel g(o)*in_per_group + c of x
        channel = channel_att[b].view(groups, in_per_group).repeat_interleave(out_per_group, dim=0)
        kernel = kernel * filter_att[b][:, None, None, None] * channel[:, :, None, None] * spatial_att[b][None, None]
        outs.append(F.conv2d(x[b:b + 1], kernel, None, stride, padding, dilation, groups))
    if not outs:
        out_h = (x.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (x.shape[3] + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return x.new_zeros(0, out_channels, out_h, out_w)
    return torch.cat(outs)


def make_inputs(batch, in_ch, out_ch, size, kernel, kernel_num, groups, dtype=torch.float64, seed=0,
                requires_grad=True):
    """x, weight and realistic attentions (sigmoid / softmax of random logits)."""
    gen = torch.Generator().manual_seed(seed)
    height, width = size if isinstance(size, tuple) else (size, size)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(batch, in_ch, height, width, generator=gen, dtype=dtype)
    weight = torch.randn(kernel_num, out_ch, in_ch // groups, kh, kw, generator=gen, dtype=dtype) * 0.5
    channel = torch.sigmoid(torch.randn(batch, in_ch, generator=gen, dtype=dtype))
    filt = torch.sigmoid(torch.randn(batch, out_ch, generator=gen, dtype=dtype))
    spatial = torch.sigmoid(torch.randn(batch, kh, kw, generator=gen, dtype=dtype))
    kern = torch.softmax(torch.randn(batch, kernel_num, generator=gen, dtype=dtype), dim=1)
    tensors = [x, weight, channel, filt, spatial, kern]
    return [t.requires_grad_(requires_grad) for t in tensors]


STRIDED_LAYOUTS = ["channels_last", "non_contiguous", "expanded_attention"]


def strided_variant(inputs, layout):
    """The same values as (x, weight, channel, filter, spatial, kernel) in non-contiguous layouts,
    each a fresh leaf that requires grad."""
    x, weight, channel, filt, spatial, kern = [t.detach() for t in inputs]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.transpose(3, 4).contiguous().transpose(3, 4)
    elif layout == "non_contiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]  # stride 2 along W
        weight = weight.transpose(0, 1).contiguous().transpose(0, 1)
        filt = torch.cat([filt, filt], dim=1)[:, ::2]
    elif layout == "expanded_attention":
        channel = channel[:1].expand(channel.shape[0], -1)
        spatial = spatial.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        raise ValueError(layout)
    tensors = [t.requires_grad_() for t in (x, weight, channel, filt, spatial, kern)]
    assert not all(t.is_contiguous() for t in tensors)
    return tensors


def tolerances(dtype):
    """(rtol, atol) for comparing two correct implementations in this dtype."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3)}[dtype]


# (batch, in, out, size, kernel, K, stride, padding, dilation, groups): covers groups incl.
# depthwise, stride, padding, dilation, rectangular kernels and maps, K = 1..4, batch 0, 1 and odd.
GRID = [
    (3, 4, 6, 7, 3, 4, 1, 1, 1, 1),
    (1, 4, 6, 7, 3, 4, 1, 1, 1, 1),
    (0, 4, 6, 7, 3, 4, 1, 1, 1, 1),
    (5, 6, 4, (9, 7), 3, 3, 2, 0, 1, 2),
    (2, 6, 6, 8, 3, 2, (2, 1), (1, 2), (2, 1), 3),
    (3, 8, 8, 6, 3, 4, 1, 1, 1, 8),          # depthwise
    (2, 4, 8, 6, 3, 2, 1, 1, 1, 4),          # depthwise with channel multiplier 2
    (3, 8, 5, 6, 1, 2, 1, 0, 1, 1),          # pointwise, im2col-free path
    (2, 6, 9, 7, 1, 3, 2, 1, 1, 3),          # pointwise with stride, padding, groups
    (3, 5, 7, (6, 9), (1, 3), 1, 1, (0, 1), 1, 1),  # rectangular kernel, K = 1
    (2, 4, 4, 10, (3, 5), 4, (1, 2), (1, 2), (1, 2), 2),
    (3, 3, 4, 9, 5, 2, 2, 2, 1, 1),
    (1, 2, 3, 3, 3, 2, 1, 0, 1, 1),          # output 1x1
    (2, 3, 2, 4, 7, 2, 1, 3, 1, 1),          # kernel larger than the map
]


def unpack(case):
    batch, cin, cout, size, kernel, K, stride, padding, dilation, groups = case
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return batch, cin, cout, size, kernel, K, pair(stride), pair(padding), pair(dilation), groups


def case_id(case):
    return "B{}_c{}-{}_s{}_k{}_K{}_st{}_p{}_d{}_g{}".format(*case).replace(" ", "")
