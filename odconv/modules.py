"""ODConv layers: ``ODConv2d`` (a superset of the official module), its attention, the temperature
schedule, and ``MultiScaleFeatureFusion``.

``ODConv2d`` keeps the official module's parameter names (``weight``, ``attention.fc.weight``,
``attention.bn.*``, ``attention.{channel,filter,spatial,kernel}_fc.*``), so official checkpoints
load, and computes the same function. It adds:

* the temperature as a buffer (``attention.temperature``), so it is saved in checkpoints and a
  changing temperature does not recompile a ``torch.compile``-d model; official checkpoints, which
  lack it, still load (the current value is kept);
* batch size 1 in training: the attention's BatchNorm has a single value per channel then, from
  which it cannot estimate statistics (the official module raises). With one sample the attention
  normalises with the running statistics, exactly as in eval mode, and leaves them unchanged; all
  gradients flow as usual;
* rectangular kernels (``kernel_size=(kh, kw)``) and an optional ``bias``.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import odconv2d

__all__ = ["Attention", "ODConv2d", "MultiScaleFeatureFusion", "set_temperature", "TemperatureSchedule"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class Attention(nn.Module):
    """The four attentions of ODConv from one squeeze of the input.

    global average pool -> 1x1 conv (no bias) -> BatchNorm -> ReLU -> four 1x1-conv heads, each
    divided by the temperature: channel (Cin), filter (Cout) and spatial (kh*kw) through a sigmoid,
    kernel (K) through a softmax. As in the official module, depthwise convolutions have no filter
    attention, 1x1 kernels no spatial attention and K = 1 no kernel attention: those are ones.
    """

    def __init__(self, in_planes, out_planes, kernel_size, groups=1, reduction=0.0625, kernel_num=4,
                 min_channel=16, temperature=1.0):
        super().__init__()
        kernel_h, kernel_w = _pair(kernel_size)
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.in_planes, self.out_planes, self.kernel_num = in_planes, out_planes, kernel_num
        self.kernel_h, self.kernel_w = kernel_h, kernel_w
        self.register_buffer("temperature", torch.tensor(float(temperature)))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = nn.BatchNorm2d(attention_channel)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
        self.has_filter = not (in_planes == groups and in_planes == out_planes)
        self.has_spatial = kernel_h * kernel_w > 1
        self.has_kernel = kernel_num > 1
        if self.has_filter:
            self.filter_fc = nn.Conv2d(attention_channel, out_planes, 1, bias=True)
        if self.has_spatial:
            self.spatial_fc = nn.Conv2d(attention_channel, kernel_h * kernel_w, 1, bias=True)
        if self.has_kernel:
            self.kernel_fc = nn.Conv2d(attention_channel, kernel_num, 1, bias=True)
        self._initialize_weights()

    def _initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def update_temperature(self, temperature):
        self.temperature.fill_(float(temperature))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Official checkpoints have no temperature: keep the current one rather than fail.
        state_dict.setdefault(prefix + "temperature", self.temperature.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _squeeze(self, x):
        z = self.fc(self.avgpool(x))
        if self.training and z.shape[0] == 1:
            # One value per channel: BatchNorm cannot estimate batch statistics. Normalise with the
            # running statistics (as in eval) and leave them unchanged.
            bn = self.bn
            z = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            z = self.bn(z)
        return self.relu(z).flatten(1)

    def forward(self, x):
        """Returns (channel (B, Cin), filter (B, Cout), spatial (B, kh, kw), kernel (B, K))."""
        z = self._squeeze(x)
        batch, t = z.shape[0], self.temperature
        channel = torch.sigmoid(self.channel_fc(z[:, :, None, None]).flatten(1) / t)
        if self.has_filter:
            filt = torch.sigmoid(self.filter_fc(z[:, :, None, None]).flatten(1) / t)
        else:
            filt = x.new_ones(batch, self.out_planes)
        if self.has_spatial:
            spatial = torch.sigmoid(self.spatial_fc(z[:, :, None, None]).flatten(1) / t)
            spatial = spatial.view(batch, self.kernel_h, self.kernel_w)
        else:
            spatial = x.new_ones(batch, self.kernel_h, self.kernel_w)
        if self.has_kernel:
            kernel = F.softmax(self.kernel_fc(z[:, :, None, None]).flatten(1) / t, dim=1)
        else:
            kernel = x.new_ones(batch, self.kernel_num)
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic convolution (Li, Zhou & Yao, ICLR 2022).

    ``ODConv2d(in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    reduction=0.0625, kernel_num=4)`` as in the official code, plus keyword-only ``min_channel``
    (width floor of the attention, 16), ``bias`` (False) and ``temperature`` (initial, 1.0).
    ``kernel_size``, ``stride``, ``padding`` and ``dilation`` take an int or an (h, w) pair.
    """

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 reduction=0.0625, kernel_num=4, *, min_channel=16, bias=False, temperature=1.0):
        super().__init__()
        if in_planes % groups or out_planes % groups:
            raise ValueError(f"ODConv2d: groups ({groups}) must divide in_planes ({in_planes}) and "
                             f"out_planes ({out_planes})")
        if kernel_num < 1:
            raise ValueError(f"ODConv2d: kernel_num must be >= 1, got {kernel_num}")
        self.in_planes, self.out_planes = in_planes, out_planes
        self.kernel_size = kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.groups, self.kernel_num = groups, kernel_num
        kernel_h, kernel_w = _pair(kernel_size)
        self.attention = Attention(in_planes, out_planes, (kernel_h, kernel_w), groups=groups,
                                   reduction=reduction, kernel_num=kernel_num, min_channel=min_channel,
                                   temperature=temperature)
        self.weight = nn.Parameter(torch.empty(kernel_num, out_planes, in_planes // groups, kernel_h, kernel_w))
        self.bias = nn.Parameter(torch.zeros(out_planes)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        for i in range(self.kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def update_temperature(self, temperature):
        self.attention.update_temperature(temperature)

    def forward(self, x):
        channel, filt, spatial, kernel = self.attention(x)
        out = odconv2d(x, self.weight, channel, filt, spatial, kernel,
                       self.stride, self.padding, self.dilation, self.groups)
        if self.bias is not None:
            out = out + self.bias[:, None, None]
        return out

    def extra_repr(self):
        return (f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"kernel_num={self.kernel_num}, bias={self.bias is not None}")


def set_temperature(model, temperature):
    """Sets the temperature of every ODConv layer of ``model``; returns how many layers it set."""
    count = 0
    for module in model.modules():
        if isinstance(module, ODConv2d):
            module.update_temperature(temperature)
            count += 1
    return count


class TemperatureSchedule:
    """The official temperature schedule: T falls linearly per iteration from ``initial`` to 1 over
    the first ``epochs`` epochs, then stays 1.

    ``schedule(epoch, iteration)`` gives T at ``iteration`` (0-based, within the epoch) of ``epoch``
    (0-based); ``epoch`` may be fractional.
    """

    def __init__(self, iters_per_epoch, epochs=10, initial=30.0):
        if iters_per_epoch < 1 or epochs < 0 or initial < 1:
            raise ValueError(f"TemperatureSchedule: need iters_per_epoch >= 1, epochs >= 0, initial >= 1; got "
                             f"{iters_per_epoch}, {epochs}, {initial}")
        self.iters_per_epoch, self.epochs, self.initial = iters_per_epoch, epochs, float(initial)

    def __call__(self, epoch, iteration=0):
        total = self.iters_per_epoch * self.epochs
        if total <= 0:
            return 1.0
        current = epoch * self.iters_per_epoch + iteration
        return 1.0 + max(0.0, (self.initial - 1.0) * (total - current) / total)


class MultiScaleFeatureFusion(nn.Module):
    """Parallel convolutions with kernel sizes 1, 3, 5 and 7 ("same" padding), summed.

    ``conv="static"`` uses ``nn.Conv2d`` branches, ``conv="odconv"`` ``ODConv2d`` branches
    (``odconv_kwargs`` go to each). The branches have no bias; follow with a norm layer.

    Static branches run as one convolution: a sum of "same"-padded convolutions with one stride is
    the convolution with their kernels zero-padded to the largest size and summed, so the module
    computes the same function (to float rounding) and keeps one weight per branch, while the
    input is read once and the 1x1/3x3/5x5 products are not computed separately. On this project's
    CPU, for the GTSRB stem (3 -> 32 channels, 48x48, batch 128), forward + backward took 80 ms
    instead of 310-370 ms. ODConv branches cannot be merged (each has its own attentions).
    """

    def __init__(self, in_ch, out_ch, kernel_sizes=(1, 3, 5, 7), stride=1, conv="static", **odconv_kwargs):
        super().__init__()
        if conv not in ("static", "odconv"):
            raise ValueError(f"MultiScaleFeatureFusion: conv must be 'static' or 'odconv', got {conv!r}")
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"MultiScaleFeatureFusion: kernel sizes must be odd for 'same' padding, got {kernel_sizes}")
        self.kernel_sizes = tuple(kernel_sizes)
        self.conv = conv
        branches = []
        for k in self.kernel_sizes:
            if conv == "static":
                branches.append(nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False))
            else:
                branches.append(ODConv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, **odconv_kwargs))
        self.branches = nn.ModuleList(branches)

    def merged_weight(self):
        """The static branches' kernels zero-padded to the largest kernel size and summed."""
        size = max(self.kernel_sizes)
        return sum(F.pad(branch.weight, [(size - k) // 2] * 4) for branch, k in zip(self.branches, self.kernel_sizes))

    def forward(self, x):
        if self.conv == "static":
            return F.conv2d(x, self.merged_weight(), stride=self.branches[0].stride, padding=max(self.kernel_sizes) // 2)
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out
