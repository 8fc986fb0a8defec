"""OREPAResNet / OREPAVGG: deploy into each toolbox's stock backbone; options; config fragments."""
import importlib

import pytest
import torch
from mmengine.registry import DefaultScope, init_default_scope

import mmorepa
from mmorepa.layers import DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv
from mmorepa.models import OREPAResNet, OREPAVGG

from helpers import randomize_network_, rel_err

SMALL = dict(base_channels=16, out_indices=(0, 1, 2, 3))
CASES = [
    ('mmpretrain', dict(depth=18, reparam='orepa')),
    ('mmdet', dict(depth=50, reparam='orepa', frozen_stages=1, norm_eval=True)),
    ('mmseg', dict(depth=50, reparam='orepa', dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                   contract_dilation=True)),
    ('mmpretrain', dict(depth=50, reparam='dbb')),
    ('mmdet', dict(depth=18, reparam='dbb')),
    ('mmpretrain', dict(depth=50, reparam='orepa', groups=8, width_per_group=4)),
    ('mmdet', dict(depth=50, reparam='orepa', groups=8, width_per_group=4)),
    ('mmseg', dict(depth=18, reparam='orepa', deep_stem=True, avg_down=True)),
    ('mmpretrain', dict(depth=50, reparam='orepa', style='caffe')),
    ('mmdet', dict(depth=18, reparam='none', stem_channels=24, base_channels=24)),
    ('mmseg', dict(depth=50, reparam='dbb', deep_stem=True, dilations=(1, 1, 1, 2),
                   strides=(1, 2, 2, 1))),
]


def _scope(toolbox):
    init_default_scope(toolbox)
    return importlib.import_module(f'{toolbox}.registry').MODELS


@pytest.mark.parametrize('toolbox,kwargs', CASES)
def test_fused_backbone_loads_into_stock(toolbox, kwargs):
    torch.manual_seed(len(str(kwargs)))
    registry = _scope(toolbox)
    cfg = dict(type='OREPAResNet', **dict(SMALL, **kwargs))
    model = registry.build(cfg)
    randomize_network_(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(2, 3, 64, 64)
    sum(o.square().mean() for o in model(x)).backward()
    opt.step()
    model.eval()
    fused = mmorepa.reparameterize(model)
    stock_cfg = OREPAResNet.stock_cfg(cfg)
    stock = registry.build(stock_cfg)
    assert type(stock).__module__.startswith(toolbox)
    stock.eval()
    stock.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        ref = torch.cat([o.flatten() for o in model(x)])
        out = torch.cat([o.flatten() for o in stock(x)])
    assert rel_err(out, ref) <= 1e-5
    # the fused model holds no mmorepa layer at all
    assert not any(type(m).__module__.startswith('mmorepa.layers') for m in fused.modules())


def test_orepa_resnet_structure_follows_sec_3_5():
    r50 = OREPAResNet(50, **SMALL)
    assert isinstance(r50.conv1, OREPALargeConv)
    assert len(r50.conv1.generators) == 3
    block = r50.layer2[0]
    assert isinstance(block.conv1, OREPAConv1x1) and isinstance(block.conv3, OREPAConv1x1)
    assert isinstance(block.conv2, OREPAConv2d) and isinstance(block.downsample[0], OREPAConv1x1)
    r18 = OREPAResNet(18, **SMALL)
    assert type(r18.layer2[0].downsample[0]) is torch.nn.Conv2d  # BasicBlock shortcut stays plain
    assert isinstance(r18.layer2[0].conv1, OREPAConv2d)
    dbb = OREPAResNet(18, reparam='dbb', **SMALL)
    assert isinstance(dbb.conv1, DiverseBranchBlock) and isinstance(dbb.layer1[0].conv2,
                                                                     DiverseBranchBlock)
    plain = OREPAResNet(18, reparam='none', **SMALL)
    assert {type(m) for m in plain.modules()
            if 'Conv' in type(m).__name__} == {torch.nn.Conv2d}
    ablation = OREPAResNet(18, orepa_cfg=dict(branches=('kxk', '1x1'), scaling='scalar',
                                              linear_deep_stem=False), **SMALL)
    assert type(ablation.conv1) is torch.nn.Conv2d
    assert ablation.layer1[0].conv1.branches == ('kxk', '1x1')
    assert ablation.layer1[0].conv1.scales.shape == (2, 1)


def test_frozen_stages_and_norm_eval():
    model = OREPAResNet(18, frozen_stages=1, norm_eval=True, **SMALL)
    model.train()
    for m in (model.conv1, model.bn1, model.layer1):
        assert not any(p.requires_grad for p in m.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_with_cp_matches():
    torch.manual_seed(0)
    a = randomize_network_(OREPAResNet(18, **SMALL))
    b = OREPAResNet(18, with_cp=True, **SMALL)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ya, yb = a(x)[-1], b(x)[-1]
    ya.sum().backward()
    ga = a.layer1[0].conv1.weight_kxk.grad.clone()
    yb.sum().backward()
    assert rel_err(yb, ya) < 1e-6
    assert rel_err(b.layer1[0].conv1.weight_kxk.grad, ga) < 1e-5


def test_bad_backbone_arguments():
    with pytest.raises(ValueError, match="reparam 'rep'"):
        OREPAResNet(18, reparam='rep')
    with pytest.raises(ValueError, match='depth 20'):
        OREPAResNet(20)
    with pytest.raises(ValueError, match='groups=32'):
        OREPAResNet(18, groups=32)
    with pytest.raises(ValueError, match="orepa_cfg key 'stem'"):
        OREPAResNet(18, orepa_cfg=dict(stem=True))
    with pytest.raises(ValueError, match='stage_blocks'):
        OREPAResNet.stock_cfg(dict(type='OREPAResNet', depth=18, stage_blocks=(1, 1, 1, 1)))


@pytest.mark.parametrize('reparam', ['orepa', 'repvgg', 'none'])
def test_orepavgg_loads_into_mmpretrain_repvgg_deploy(reparam):
    torch.manual_seed(1)
    registry = _scope('mmpretrain')
    cfg = dict(type='OREPAVGG', arch='A0', reparam=reparam, out_indices=(3, ))
    model = registry.build(cfg)
    randomize_network_(model)
    model.eval()
    fused = mmorepa.reparameterize(model)
    stock = registry.build(OREPAVGG.stock_cfg(cfg))
    stock.eval()
    stock.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(stock(x)[0], model(x)[0]) <= 1e-5


def test_stem_lr_fragment_sets_a_tenth():
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile('configs/faster_rcnn_orepa_r50_1x_coco.py')
    registry = _scope('mmdet')
    backbone = dict(cfg.model.backbone, init_cfg=None, stage_blocks=(1, 1, 1, 1),
                    base_channels=16)
    model = registry.build(dict(cfg.model, backbone=backbone,
                                neck=dict(cfg.model.neck, in_channels=[64, 128, 256, 512])))
    assert model.backbone.frozen_stages == -1
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    base_lr = cfg.optim_wrapper.optimizer.lr
    names = {id(p): n for n, p in model.named_parameters()}
    seen_stem = 0
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            stem = name.startswith('backbone.conv1.') or name.startswith('backbone.bn1.')
            assert group['lr'] == pytest.approx(base_lr * (0.1 if stem else 1.0)), name
            seen_stem += stem
    assert seen_stem > 0


def teardown_module():
    DefaultScope._instance_dict.clear()
