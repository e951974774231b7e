"""ODConv2d against the official module; batch size 1; temperature; MultiScaleFeatureFusion."""
import copy
import io

import pytest
import torch

import odconv
from official_odconv import OfficialODConv2d

# (in, out, kernel, stride, padding, dilation, groups, K): the official skip rules included
CONFIGS = [
    (16, 32, 3, 1, 1, 1, 1, 4),
    (32, 16, 3, 2, 1, 1, 1, 2),
    (24, 24, 3, 1, 1, 1, 24, 4),   # depthwise: no filter attention
    (16, 32, 1, 1, 0, 1, 1, 4),    # pointwise: no spatial attention
    (16, 32, 1, 1, 0, 1, 1, 1),    # pointwise, K = 1: the official pw1x path
    (16, 16, 5, 1, 4, 2, 2, 1),    # K = 1: no kernel attention
]


def _pair(module_args):
    torch.manual_seed(0)
    ours = odconv.ODConv2d(*module_args[:7], kernel_num=module_args[7]).double()
    official = OfficialODConv2d(*module_args[:7], kernel_num=module_args[7]).double()
    return ours, official


@pytest.mark.parametrize("args", CONFIGS, ids=lambda a: "_".join(map(str, a)))
def test_state_dict_keys_equal_official(args):
    ours, official = _pair(args)
    official_keys = set(official.state_dict())
    our_keys = set(ours.state_dict())
    assert official_keys <= our_keys
    assert our_keys - official_keys == {"attention.temperature"}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("args", CONFIGS, ids=lambda a: "_".join(map(str, a)))
def test_matches_official_module(args, mode):
    ours, official = _pair(args)
    # randomise BN statistics and biases so eval mode and every head are exercised
    with torch.no_grad():
        for m in official.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(official.state_dict(), strict=True)  # an official checkpoint loads as is
    for module in (ours, official):
        module.train(mode == "train")
        module.update_temperature(4.0)
    x = torch.randn(5, args[0], 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ours, x_official = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours, out_official = ours(x_ours), official(x_official)
    torch.testing.assert_close(out_ours, out_official, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out_ours)
    params_ours = dict(ours.named_parameters())
    params_official = dict(official.named_parameters())
    names = sorted(params_official)
    got = torch.autograd.grad(out_ours, [x_ours] + [params_ours[n] for n in names], grad)
    want = torch.autograd.grad(out_official, [x_official] + [params_official[n] for n in names], grad)
    for name, g, w in zip(["x"] + names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
    if mode == "train":  # running statistics updated identically
        torch.testing.assert_close(ours.attention.bn.running_mean, official.attention.bn.running_mean)


def test_batch_size_one_training_step():
    torch.manual_seed(0)
    layer = odconv.ODConv2d(8, 16, 3, padding=1)
    official = OfficialODConv2d(8, 16, 3, padding=1)
    official.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "attention.temperature"})
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        official.train()(x)  # the bug users reported against the official module
    layer.train()
    stats_before = layer.attention.bn.running_mean.clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    out = layer(x)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)
    optimizer.step()
    # B = 1 in training normalises with the running statistics, as eval does, and leaves them unchanged
    assert torch.equal(layer.attention.bn.running_mean, stats_before)
    with torch.no_grad():
        torch.testing.assert_close(layer.train()(x), layer.eval()(x))


def test_temperature_changes_outputs_and_is_saved():
    torch.manual_seed(0)
    layer = odconv.ODConv2d(8, 16, 3, padding=1).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer.update_temperature(1.0)
        out_cold = layer(x)
        layer.update_temperature(30.0)
        out_hot = layer(x)
    assert not torch.allclose(out_cold, out_hot, rtol=1e-3, atol=1e-4)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = odconv.ODConv2d(8, 16, 3, padding=1).eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.attention.temperature.item() == 30.0
    with torch.no_grad():
        torch.testing.assert_close(restored(x), out_hot)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Sequential(odconv.ODConv2d(3, 8, 3, padding=1, bias=True), torch.nn.ReLU(),
                                odconv.ODConv2d(8, 8, (1, 3), padding=(0, 1), groups=2, kernel_num=2))
    model(torch.randn(4, 3, 8, 8))  # moves BN statistics
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        torch.nn.init.normal_(p)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_set_temperature_and_official_schedule():
    model = torch.nn.Sequential(odconv.ODConv2d(3, 8, 3), torch.nn.ReLU(), odconv.ODConv2d(8, 8, 3))
    assert odconv.set_temperature(model, 7.5) == 2
    assert all(m.attention.temperature.item() == 7.5 for m in model if isinstance(m, odconv.ODConv2d))
    schedule = odconv.TemperatureSchedule(iters_per_epoch=100, epochs=10, initial=30.0)
    assert schedule(0, 0) == 30.0
    assert schedule(5, 0) == pytest.approx(1.0 + 29.0 * 0.5)
    assert schedule(9, 99) == pytest.approx(1.0 + 29.0 / 1000)
    assert schedule(10, 0) == 1.0 and schedule(50, 3) == 1.0
    values = [schedule(e, i) for e in range(11) for i in range(100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="groups"):
        odconv.ODConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="kernel_num"):
        odconv.ODConv2d(6, 8, 3, kernel_num=0)


def test_multi_scale_feature_fusion_is_sum_of_branches():
    torch.manual_seed(0)
    fusion = odconv.MultiScaleFeatureFusion(3, 8)
    assert [b.kernel_size for b in fusion.branches] == [(1, 1), (3, 3), (5, 5), (7, 7)]
    x = torch.randn(2, 3, 11, 11)
    out = fusion(x)
    assert out.shape == (2, 8, 11, 11)
    expected = sum(torch.nn.functional.conv2d(x, b.weight, padding=b.kernel_size[0] // 2) for b in fusion.branches)
    torch.testing.assert_close(out, expected)
    dynamic = odconv.MultiScaleFeatureFusion(3, 8, conv="odconv", kernel_num=2).eval()
    assert all(isinstance(b, odconv.ODConv2d) for b in dynamic.branches)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), sum(b(x) for b in dynamic.branches))
    with pytest.raises(ValueError, match="odd"):
        odconv.MultiScaleFeatureFusion(3, 8, kernel_sizes=(2, 3))


@pytest.mark.parametrize("kernel_sizes,stride,size", [((1, 3, 5, 7), 1, 11), ((3, 7), 2, 10), ((5, 1), 3, 9)])
def test_static_fusion_as_one_convolution_matches_its_branches(kernel_sizes, stride, size):
    # the merged-kernel forward against the branches run one by one, in float64: values and the
    # gradients of the input and of every branch's weight
    torch.manual_seed(0)
    fusion = odconv.MultiScaleFeatureFusion(3, 5, kernel_sizes=kernel_sizes, stride=stride).double()
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = fusion(x)
    expected = sum(branch(x) for branch in fusion.branches)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    params = [x] + [b.weight for b in fusion.branches]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fusion, (x,))
