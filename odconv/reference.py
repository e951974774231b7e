"""The odconv2d operator in pure PyTorch: the fallback where the extension is not built, and the
oracle the extension is tested against.

It is the formulation of the official ODConv code: build every sample's kernel

    W_b[o,c,u,v] = filter_att[b,o] * channel_att[b,c] * spatial_att[b,u,v] * sum_k kernel_att[b,k] * W_k[o,c,u,v]

for the whole batch, then run one grouped convolution with groups = B * groups. (As in the official
code, channel and filter attention are applied to the feature maps, which is the same function.)
That holds all B per-sample kernels in memory at once, which is what the extension avoids.
"""
import torch
import torch.nn.functional as F


def odconv2d_reference(x, weight, channel_att, filter_att, spatial_att, kernel_att,
                       stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    batch, in_channels, height, width = x.shape
    _, out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    if batch == 0:
        # A grouped convolution cannot have zero groups; an empty batch has an empty output whose
        # gradients are zero, so convolve with any kernel of the right shape and keep every input
        # in the graph.
        touch = spatial_att.sum() + kernel_att.sum()
        out = F.conv2d(x * channel_att[:, :, None, None], weight.sum(0) * (1 + touch), None,
                       stride, padding, dilation, groups)
        return out * filter_att[:, :, None, None]
    x = (x * channel_att[:, :, None, None]).reshape(1, batch * in_channels, height, width)
    # (B, K, 1, 1, 1, 1) * (1, K, Cout, Cin/g, kh, kw) summed over K -> (B, Cout, Cin/g, kh, kw)
    kernels = (kernel_att[:, :, None, None, None, None] * weight.unsqueeze(0)).sum(1)
    kernels = kernels * spatial_att[:, None, None, :, :]
    kernels = kernels.reshape(batch * out_channels, in_per_group, kernel_h, kernel_w)
    out = F.conv2d(x, kernels, None, stride, padding, dilation, groups * batch)
    out = out.view(batch, out_channels, out.shape[-2], out.shape[-1])
    return out * filter_att[:, :, None, None]
