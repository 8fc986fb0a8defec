"""Every OREPA layer takes a plain conv's weight exactly, strictly and through mmengine's loaders:
grouped and depthwise large kernels of any odd size included (the generators' composition plus
the layer's ``seed_kernel``), and whole networks built on them (ConvNeXt's 7x7 depthwise)."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner import load_checkpoint

from mmorepa.layers import OREPA, OREPALargeConv, ReparamConv2d

from helpers import LogRecords, randomize_network_, rel_err

GEOMETRIES = [  # (C_in, C_out, k, groups, bias)
    (6, 6, 7, 6, True),      # depthwise 7x7 (ConvNeXt)
    (4, 4, 5, 4, False),     # depthwise 5x5 (EfficientNet, MobileNetV3)
    (4, 4, 13, 4, False),    # depthwise 13x13 (RepLKNet)
    (4, 8, 7, 2, False),     # grouped
    (8, 8, 5, 1, True),      # dense with C_out < 9 C_in: no exact factorisation
    (3, 32, 7, 1, False),    # the stem: the factorisation is exact, no seed kernel needed
]


@pytest.mark.parametrize('c_in,c_out,k,groups,bias', GEOMETRIES)
def test_plain_weight_seeds_any_large_layer_exactly(c_in, c_out, k, groups, bias):
    torch.manual_seed(k + groups)
    plain = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=bias)
    layer = OREPA(c_in, out_channels=c_out, kernel_size=k, padding=k // 2, groups=groups,
                  bias=bias)
    assert isinstance(layer, OREPALargeConv)
    with LogRecords() as log:
        layer.load_state_dict(plain.state_dict(), strict=True)
    assert 'seeded from a plain' in log.text() and 'NOT exact' not in log.text()
    kernel, b = layer.squeezed_kernel_and_bias()
    assert rel_err(kernel, plain.weight) <= 1e-6
    if bias:
        assert rel_err(b, plain.bias) <= 1e-7
    x = torch.randn(2, c_in, 16, 16, dtype=torch.float64)
    layer.double().train()
    with torch.no_grad():
        assert rel_err(layer(x), F.conv2d(x, plain.weight.double(),
                                          None if not bias else plain.bias.double(),
                                          padding=k // 2, groups=groups)) <= 1e-6
    # a dense stem that factors exactly leaves the seed kernel at (nearly) zero
    if groups == 1 and c_out >= 9 * c_in:
        assert layer.seed_kernel.abs().max() <= 1e-6 * plain.weight.abs().max()


def test_checkpoint_without_a_seed_kernel_loads_it_as_zeros():
    torch.manual_seed(0)
    layer = OREPA(4, 4, 7, padding=3, groups=4)
    state = {k: v for k, v in layer.state_dict().items() if k != 'seed_kernel'}
    other = OREPA(4, 4, 7, padding=3, groups=4)
    with torch.no_grad():
        other.seed_kernel.fill_(1.0)
    other.load_state_dict(state, strict=True)
    assert other.seed_kernel.abs().max() == 0
    assert rel_err(other.squeezed_kernel_and_bias()[0], layer.squeezed_kernel_and_bias()[0]) == 0


def _scope(toolbox):
    init_default_scope(toolbox)
    return importlib.import_module(f'{toolbox}.registry').MODELS


CONVNEXT = dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 16, 16]))


def test_convnext_starts_from_its_stock_weights(tmp_path):
    torch.manual_seed(3)
    registry = _scope('mmpretrain')
    stock = randomize_network_(registry.build(dict(type='ConvNeXt', **CONVNEXT)))
    x = torch.randn(2, 3, 32, 32)
    stock.eval()
    with torch.no_grad():
        expected = torch.cat([o.flatten() for o in stock(x)])
    # strictly
    model = registry.build(dict(type='OREPAConvNeXt', **CONVNEXT))
    large = [m for m in model.modules() if isinstance(m, OREPALargeConv)]
    assert len(large) == 4 and all(m.groups == m.in_channels for m in large)
    model.load_state_dict(stock.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        assert rel_err(torch.cat([o.flatten() for o in model(x)]), expected) <= 1e-5
    # mmengine's non-strict loader (load_from, init_cfg=Pretrained)
    path = tmp_path / 'convnext.pth'
    torch.save(dict(state_dict=stock.state_dict()), path)
    fresh = registry.build(dict(type='OREPAConvNeXt', **CONVNEXT))
    with LogRecords() as log:
        load_checkpoint(fresh, str(path), strict=False, logger='current')
    assert 'NOT exact' not in log.text() and 'missing keys' not in log.text()
    fresh.eval()
    with torch.no_grad():
        assert rel_err(torch.cat([o.flatten() for o in fresh(x)]), expected) <= 1e-5
    assert sum(isinstance(m, ReparamConv2d) for m in fresh.modules()) >= 4


def teardown_module():
    DefaultScope._instance_dict.clear()
