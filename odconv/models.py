"""The GTSRB traffic-sign network: a multi-scale stem, ODConv blocks, a linear classifier.

    stem    MultiScaleFeatureFusion(3 -> w0): 1x1, 3x3, 5x5, 7x7 convolutions summed, BN, ReLU
    stage i blocks[i] x (conv 3x3 -> BN -> ReLU), widths[i] channels, then 2x2 max-pool
            (conv = ODConv2d, or nn.Conv2d in the ``static`` twin used for the ablation)
    head    global average pool -> dropout -> linear (num_classes)

``build_model(config)`` rebuilds a network from the config stored in a checkpoint.

Attention initialisation (``attention_init``): with the official initialisation (kaiming normal
for the attention heads) the attentions of a fresh network are already far from uniform at
temperature 1 (kernel-attention logits have a standard deviation of about 2), so each sample
starts from an arbitrary, input-dependent mix of random kernels, and this network barely trains
until the temperature has been high for a long time: 60 SGD steps at T = 1 took the loss from 3.9
to 3.4, against 1.2 for the static twin. ``"zero"`` (the default here) zeroes the four heads
instead: every attention starts neutral (sigmoids at 0.5, uniform kernel mix), so the network
starts as a static convolution with the mean kernel and learns the attentions from there (loss 1.3
after the same 60 steps). ``"official"`` keeps the module's initialisation.
"""
import torch
import torch.nn as nn

from .modules import MultiScaleFeatureFusion, ODConv2d

__all__ = ["GTSRBNet", "MODEL_DEFAULTS", "build_model", "count_parameters", "count_macs"]

MODEL_DEFAULTS = {
    "name": "gtsrb_net",
    "conv": "odconv",          # "odconv" or "static"
    "num_classes": 43,
    "stem_width": 32,
    "widths": [32, 64, 128, 256],
    "blocks": [1, 2, 2, 1],
    "kernel_num": 4,
    "reduction": 0.0625,
    "dropout": 0.3,
    "attention_init": "zero",  # "zero" or "official", see above
}


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch, out_ch, conv, kernel_num, reduction):
        if conv == "odconv":
            layer = ODConv2d(in_ch, out_ch, 3, padding=1, kernel_num=kernel_num, reduction=reduction)
        else:
            layer = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        super().__init__(layer, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class GTSRBNet(nn.Module):
    def __init__(self, **config):
        super().__init__()
        unknown = set(config) - set(MODEL_DEFAULTS)
        if unknown:
            raise ValueError(f"GTSRBNet: unknown config keys {sorted(unknown)}")
        cfg = {**MODEL_DEFAULTS, **config}
        if cfg["conv"] not in ("odconv", "static"):
            raise ValueError(f"GTSRBNet: conv must be 'odconv' or 'static', got {cfg['conv']!r}")
        if len(cfg["widths"]) != len(cfg["blocks"]):
            raise ValueError(f"GTSRBNet: widths {cfg['widths']} and blocks {cfg['blocks']} differ in length")
        self.config = cfg
        self.stem = nn.Sequential(MultiScaleFeatureFusion(3, cfg["stem_width"]), nn.BatchNorm2d(cfg["stem_width"]),
                                  nn.ReLU(inplace=True))
        stages, in_ch = [], cfg["stem_width"]
        for width, blocks in zip(cfg["widths"], cfg["blocks"]):
            layers = []
            for _ in range(blocks):
                layers.append(ConvBNReLU(in_ch, width, cfg["conv"], cfg["kernel_num"], cfg["reduction"]))
                in_ch = width
            layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg["dropout"]),
                                  nn.Linear(in_ch, cfg["num_classes"]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if cfg["attention_init"] not in ("zero", "official"):
            raise ValueError(f"GTSRBNet: attention_init must be 'zero' or 'official', got {cfg['attention_init']!r}")
        for m in self.modules():
            if isinstance(m, ODConv2d):
                m.reset_parameters()  # the loop above re-initialised its attention convs too
                if cfg["attention_init"] == "official":
                    m.attention._initialize_weights()
                else:
                    for head in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc"):
                        if hasattr(m.attention, head):
                            nn.init.zeros_(getattr(m.attention, head).weight)
                            nn.init.zeros_(getattr(m.attention, head).bias)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def build_model(config):
    """A network from a (possibly partial) config dict, e.g. the one saved in a checkpoint."""
    config = dict(config)
    name = config.pop("name", MODEL_DEFAULTS["name"])
    if name != MODEL_DEFAULTS["name"]:
        raise ValueError(f"unknown model {name!r}; this version builds {MODEL_DEFAULTS['name']!r}")
    return GTSRBNet(**config)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model, input_size):
    """Multiply-accumulates of one image's forward pass, counting convolutions (ODConv: the
    convolution with the per-sample kernel plus the kernel aggregation; a static multi-scale
    fusion: the one convolution with the merged kernel that it runs) and linear layers."""
    macs = []

    def fusion_hook(module, inputs, output):
        macs.append(output[0].numel() * module.merged_weight()[0].numel())

    def conv_hook(module, inputs, output):
        out_elems = output[0].numel()  # per image
        if isinstance(module, ODConv2d):
            k_elems = module.weight[0].numel()
            macs.append(out_elems * k_elems // module.out_planes + module.kernel_num * k_elems)
        else:
            macs.append(out_elems * module.weight[0].numel())

    def linear_hook(module, inputs, output):
        macs.append(module.in_features * module.out_features)

    handles = []
    for m in model.modules():
        if isinstance(m, MultiScaleFeatureFusion) and m.conv == "static":
            handles.append(m.register_forward_hook(fusion_hook))  # its branches do not run
        elif isinstance(m, (nn.Conv2d, ODConv2d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, input_size, input_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(macs)
