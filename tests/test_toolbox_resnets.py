"""``conv_cfg=dict(type='OREPA')`` in the stock ResNets of mmpretrain, mmdet and mmseg: builds,
trains a step, and its fused state_dict loads strictly into the same stock ResNet."""
import importlib

import pytest
import torch

import mmorepa
from mmorepa.layers import OREPAConv1x1, OREPAConv2d, OREPALargeConv

from helpers import randomize_network_, rel_err

TOOLBOXES = ['mmpretrain', 'mmdet', 'mmseg']


def _build(toolbox, **kwargs):
    registry = importlib.import_module(f'{toolbox}.registry').MODELS
    return registry.build(dict(type='ResNet', **kwargs))


def _outputs(model, x):
    out = model(x)
    return torch.cat([o.flatten() for o in (out if isinstance(out, (tuple, list)) else [out])])


@pytest.mark.parametrize('toolbox', TOOLBOXES)
@pytest.mark.parametrize('depth', [18, 50])
def test_stock_resnet_with_orepa_conv_cfg(toolbox, depth):
    torch.manual_seed(depth)
    kwargs = dict(depth=depth, out_indices=(0, 1, 2, 3))
    model = _build(toolbox, conv_cfg=dict(type='OREPA'), **kwargs)
    kinds = {type(m) for m in model.modules()}
    # every conv goes through conv_cfg: 7x7 stem, 3x3s, and the 1x1s (downsample, bottleneck)
    assert {OREPAConv2d, OREPALargeConv, OREPAConv1x1} <= kinds
    assert not any(type(m) is torch.nn.Conv2d for m in model.modules())
    randomize_network_(model)
    # one training step
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64)
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    # deploy: fuse, load strictly into the stock ResNet, same output
    model.eval()
    fused = mmorepa.reparameterize(model)
    stock = _build(toolbox, **kwargs)
    stock.eval()  # mmpretrain's ResNet.train() returns None: no chaining
    stock.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        ref = _outputs(model, x)
        assert rel_err(_outputs(stock, x), ref) <= 1e-5
        assert rel_err(_outputs(fused, x), ref) <= 1e-5
