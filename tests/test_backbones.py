"""OREPAResNet / OREPAVGG are the toolboxes' own networks with OREPA layers swapped in: their
blocks and keys are the stock ones, every stock option works, and fused they are the stock
network."""

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope

import mmorepa
from mmorepa.layers import DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv
from mmorepa.models import OREPAResNet, OREPAVGG
from mmorepa.models.backbones.orepa_resnet import resnet_conv_cfg

from helpers import randomize_network_, rel_err, toolbox_registry

TOOLBOXES = ['mmpretrain', 'mmdet', 'mmseg']
SMALL = dict(base_channels=16, stem_channels=16, out_indices=(0, 1, 2, 3))
DCN = dict(dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
           stage_with_dcn=(False, True, False, True))
CASES = [
    ('mmpretrain', dict(depth=18, reparam='orepa')),
    ('mmdet', dict(depth=50, reparam='orepa', frozen_stages=1, norm_eval=True)),
    ('mmseg', dict(depth=50, reparam='orepa', dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1),
                   contract_dilation=True, multi_grid=(1, 2, 4))),
    ('mmpretrain', dict(depth=50, reparam='dbb', drop_path_rate=0.1)),
    ('mmdet', dict(depth=18, reparam='dbb')),
    ('mmpretrain', dict(depth=50, reparam='orepa', groups=8, width_per_group=4)),
    ('mmdet', dict(depth=50, reparam='orepa', groups=8, base_width=4)),
    ('mmseg', dict(depth=18, reparam='orepa', deep_stem=True, avg_down=True)),
    ('mmpretrain', dict(depth=50, reparam='orepa', style='caffe')),
    ('mmdet', dict(depth=18, reparam='none')),
    ('mmdet', dict(depth=50, reparam='orepa', **DCN)),
    ('mmdet', dict(depth=50, reparam='orepa', plugins=[dict(
        cfg=dict(type='ContextBlock', ratio=1. / 4), stages=(False, True, False, False),
        position='after_conv3')])),
    ('mmseg', dict(depth=50, reparam='dbb', deep_stem=True, dilations=(1, 1, 1, 2),
                   strides=(1, 2, 2, 1))),
]


def _outputs(model, x):
    return torch.cat([o.flatten() for o in model(x)])


def _step(model, x):
    """One SGD step in train mode, so that kernels and BN statistics are not at their init."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sum(o.square().mean() for o in model(x)).backward()
    opt.step()
    model.eval()


@pytest.mark.parametrize('toolbox,kwargs', CASES, ids=[f'{t}-{i}' for i, (t, _) in
                                                        enumerate(CASES)])
def test_fused_backbone_is_the_stock_network(toolbox, kwargs):
    torch.manual_seed(3)
    registry = toolbox_registry(toolbox)
    cfg = dict(type='OREPAResNet', **dict(SMALL, **kwargs))
    model = randomize_network_(registry.build(cfg))
    stock_cls = type(registry.build(OREPAResNet.stock_cfg(cfg)))
    # the stock class itself, subclassed: every block is the toolbox's own
    assert isinstance(model, stock_cls) and stock_cls.__module__.startswith(toolbox)
    x = torch.randn(2, 3, 96, 96)  # DCN: the last stage's maps must be as large as the kernel
    _step(model, x)
    fused = mmorepa.reparameterize(model)
    stock = registry.build(OREPAResNet.stock_cfg(cfg))
    stock.eval()
    stock.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        ref = _outputs(model, x)
        assert rel_err(_outputs(stock, x), ref) <= 1e-5
    # the fused model holds no mmorepa layer at all
    assert not any(type(m).__module__.startswith('mmorepa.layers') for m in fused.modules())
    # deploy=True builds that fused form directly (mmpretrain's convention)
    direct = registry.build(dict(cfg, deploy=True))
    assert direct.deploy and set(direct.state_dict()) == set(stock.state_dict())


def test_dcn_stages_stay_deformable_and_the_rest_is_orepa():
    from mmcv.ops import DeformConv2dPack
    registry = toolbox_registry('mmdet')
    model = registry.build(dict(type='OREPAResNet', depth=50, **SMALL, **DCN))
    for i, with_dcn in enumerate(DCN['stage_with_dcn']):
        block = getattr(model, f'layer{i + 1}')[0]
        if with_dcn:  # the offset conv is part of the deformable conv: left as it is
            assert type(block.conv2) is DeformConv2dPack
            assert type(block.conv2.conv_offset) is nn.Conv2d
        else:
            assert isinstance(block.conv2, OREPAConv2d)
        assert isinstance(block.conv1, OREPAConv1x1) and isinstance(block.conv3, OREPAConv1x1)
    assert not any(type(m) is nn.Conv2d for n, m in model.named_modules()
                   if not n.endswith('conv_offset'))


@pytest.mark.parametrize('depth', [18, 50])
def test_one_key_set_across_toolboxes_and_conv_cfg(depth):
    keys = {}
    for toolbox in TOOLBOXES:
        registry = toolbox_registry(toolbox)
        model = registry.build(dict(type='OREPAResNet', depth=depth, out_indices=(3, )))
        block = model.layer1[0]
        assert type(block).__module__ == f'{toolbox}.models.backbones.resnet'
        keys[toolbox] = set(model.state_dict())
        # the same network as the stock ResNet with the equivalent conv_cfg
        stock = registry.build(dict(type='ResNet', depth=depth, out_indices=(3, ),
                                    conv_cfg=resnet_conv_cfg(bottleneck=depth >= 50)))
        assert set(stock.state_dict()) == keys[toolbox]
        assert [type(m) for m in stock.modules()][1:] == [type(m) for m in model.modules()][1:]
    assert keys['mmpretrain'] == keys['mmdet'] == keys['mmseg']


def test_orepa_resnet_structure_follows_sec_3_5():
    toolbox_registry('mmpretrain')
    r50 = OREPAResNet(50, **SMALL)
    assert isinstance(r50.conv1, OREPALargeConv)
    assert len(r50.conv1.generators) == 3
    block = r50.layer2[0]
    assert isinstance(block.conv1, OREPAConv1x1) and isinstance(block.conv3, OREPAConv1x1)
    assert isinstance(block.conv2, OREPAConv2d) and isinstance(block.downsample[0], OREPAConv1x1)
    r18 = OREPAResNet(18, **SMALL)
    assert type(r18.layer2[0].downsample[0]) is nn.Conv2d  # BasicBlock shortcut stays plain
    assert isinstance(r18.layer2[0].conv1, OREPAConv2d)
    dbb = OREPAResNet(18, reparam='dbb', **SMALL)
    assert isinstance(dbb.conv1, DiverseBranchBlock) and isinstance(dbb.layer1[0].conv2,
                                                                     DiverseBranchBlock)
    assert type(dbb.layer2[0].downsample[0]) is nn.Conv2d
    plain = OREPAResNet(18, reparam='none', **SMALL)
    assert {type(m) for m in plain.modules() if 'Conv' in type(m).__name__} == {nn.Conv2d}
    ablation = OREPAResNet(18, orepa_cfg=dict(branches=('kxk', '1x1'), scaling='scalar',
                                              linear_deep_stem=False), **SMALL)
    assert type(ablation.conv1) is nn.Conv2d
    assert ablation.layer1[0].conv1.branches == ('kxk', '1x1')
    assert ablation.layer1[0].conv1.scales.shape == (2, 1)
    no_rep = OREPAResNet(50, orepa_cfg=dict(rep_1x1=False), **SMALL)
    assert type(no_rep.layer1[0].conv1) is nn.Conv2d


def test_frozen_stages_and_norm_eval():
    toolbox_registry('mmdet')
    model = OREPAResNet(18, frozen_stages=1, norm_eval=True, **SMALL)
    # frozen before train() is ever called: the swapped layers keep the stock requires_grad
    assert not any(p.requires_grad for p in model.conv1.parameters())
    model.train()
    for m in (model.conv1, model.bn1, model.layer1):
        assert not any(p.requires_grad for p in m.parameters())
    assert all(p.requires_grad for p in model.layer2.parameters())
    assert not any(m.training for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_with_cp_matches():
    torch.manual_seed(0)
    toolbox_registry('mmpretrain')
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


@pytest.mark.parametrize('toolbox,stock,avg_down', [
    ('mmpretrain', 'ResNetV1d', True), ('mmdet', 'ResNetV1d', True), ('mmseg', 'ResNetV1d', True),
    ('mmpretrain', 'ResNetV1c', False), ('mmseg', 'ResNetV1c', False)])
def test_deep_stem_loads_into_v1c_v1d(toolbox, stock, avg_down):
    """Each toolbox's own deep-stem layout (mmpretrain: ConvModules, mmdet / mmseg: a flat
    Sequential). avg_down moves the shortcut conv behind a pooling (``downsample.1``), so only
    a V1d takes it; mmdet has no V1c."""
    torch.manual_seed(4)
    registry = toolbox_registry(toolbox)
    model = randomize_network_(registry.build(dict(
        type='OREPAResNet', depth=50, deep_stem=True, avg_down=avg_down, **SMALL)))
    x = torch.randn(2, 3, 64, 64)
    _step(model, x)
    fused = mmorepa.reparameterize(model)
    target = registry.build(dict(type=stock, depth=50, **SMALL))
    target.load_state_dict(fused.state_dict(), strict=True)
    target.eval()
    with torch.no_grad():
        assert rel_err(_outputs(target, x), _outputs(model, x)) <= 1e-5


@pytest.mark.parametrize('toolbox', TOOLBOXES)
@pytest.mark.parametrize('conv_type', ['DiverseBranchBlock', 'DBB'])
def test_dbb_through_conv_cfg_deploys_into_the_stock_resnet(toolbox, conv_type):
    torch.manual_seed(5)
    registry = toolbox_registry(toolbox)
    kwargs = dict(depth=18, **SMALL)
    model = randomize_network_(registry.build(dict(type='ResNet', conv_cfg=dict(type=conv_type),
                                                   **kwargs)))
    assert any(isinstance(m, DiverseBranchBlock) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    _step(model, x)
    fused = mmorepa.reparameterize(model)
    assert all(m.bias is None for m in fused.modules() if isinstance(m, nn.Conv2d))
    stock = registry.build(dict(type='ResNet', **kwargs))
    stock.load_state_dict(fused.state_dict(), strict=True)
    stock.eval()
    with torch.no_grad():
        assert rel_err(_outputs(stock, x), _outputs(model, x)) <= 1e-5


def test_bad_backbone_arguments():
    toolbox_registry('mmpretrain')
    with pytest.raises(ValueError, match="reparam 'rep'"):
        OREPAResNet(18, reparam='rep')
    with pytest.raises(ValueError, match='depth 20'):
        OREPAResNet(20)
    with pytest.raises(ValueError, match="orepa_cfg key 'stem'"):
        OREPAResNet(18, orepa_cfg=dict(stem=True))
    with pytest.raises(ValueError, match="orepa_cfg .* is for reparam='orepa'"):
        OREPAResNet(18, reparam='dbb', orepa_cfg=dict(scaling='none'))
    with pytest.raises(ValueError, match=r'stage_blocks must be positive ints, got \(0, 1'):
        OREPAResNet(18, stage_blocks=(0, 1, 1, 1))
    # no stock counterpart: the same backbone, fused (deploy=True), is the deploy form
    assert OREPAResNet.stock_cfg(dict(type='OREPAResNet', depth=18, reparam='dbb',
                                      stage_blocks=(1, 1, 1, 1))) == dict(
        type='OREPAResNet', deploy=True, stage_blocks=(1, 1, 1, 1), depth=18)
    with pytest.raises(ValueError, match="reparam 'none'"):
        OREPAVGG('A0', reparam='none')
    with pytest.raises(ValueError, match=r'stage_blocks=\(1, 1\) is for ResNets'):
        OREPAVGG('A0', stage_blocks=(1, 1))


def test_conv_cfg_and_reparam_layers_already_built_are_left_alone():
    toolbox_registry('mmdet')
    with pytest.raises(ValueError, match="conv_cfg=.*'DBB'.*reparam='orepa'"):
        OREPAResNet(18, conv_cfg=dict(type='DBB'))
    # reparam='none' with a conv_cfg: the stock ResNet with that conv_cfg, nothing swapped inside
    model = OREPAResNet(18, reparam='none', conv_cfg=dict(type='DBB'), **SMALL)
    dbb = model.layer1[0].conv1
    assert isinstance(dbb, DiverseBranchBlock) and type(dbb.branch_kxk.conv) is nn.Conv2d
    with pytest.raises(ValueError, match=r'cannot re-parameterize 0 .*kernel_size 1, 3 or odd'):
        from mmorepa.models.backbones.reparam_backbone import swap_convs_
        swap_convs_(nn.Sequential(nn.Conv2d(3, 4, 4)), dict(type='OREPA'), '')


def test_generated_classes_pickle_across_processes(tmp_path):
    import subprocess
    import sys
    toolbox_registry('mmdet')
    model = OREPAResNet(18, **SMALL)
    torch.save(model, tmp_path / 'model.pth')
    proc = subprocess.run([sys.executable, '-c', (
        'import torch, mmorepa; m = torch.load({!r}, weights_only=False); '
        'print(type(m).__name__, type(m).__mro__[2].__module__)').format(
            str(tmp_path / 'model.pth'))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ['OREPAResNet', 'mmdet.models.backbones.resnet']


def test_official_import_configs_deploy(tmp_path):
    from mmorepa.official import model_cfg
    toolbox_registry('mmpretrain')
    cfg = model_cfg(dict(bottleneck=True, stage_blocks=(3, 4, 6, 3), stem_channels=64,
                         base_channels=64, num_classes=10, feat_dim=2048))
    assert OREPAResNet.stock_cfg(cfg['backbone'])['type'] == 'ResNet'


def test_stage_blocks_builds_those_blocks():
    toolbox_registry('mmdet')
    model = OREPAResNet(50, stage_blocks=(1, 2, 1, 1), **SMALL)
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [1, 2, 1, 1]


def _repvgg_case(reparam):
    torch.manual_seed(1)
    registry = toolbox_registry('mmpretrain')
    cfg = dict(type='OREPAVGG', arch='A0', reparam=reparam, out_indices=(3, ))
    return registry, cfg, randomize_network_(registry.build(cfg))


@pytest.mark.parametrize('reparam', ['orepa', 'repvgg'])
def test_orepavgg_fuses_into_mmpretrain_repvgg_deploy(reparam):
    registry, cfg, model = _repvgg_case(reparam)
    from mmpretrain.models.backbones.repvgg import RepVGG, RepVGGBlock
    assert isinstance(model, RepVGG)
    assert type(model.stem) is RepVGGBlock and all(type(b) is RepVGGBlock for b in model.stage_1)
    if reparam == 'orepa':
        assert isinstance(model.stage_1[0].branch_3x3.conv, OREPAConv2d)
        assert type(model.stage_1[0].branch_1x1.conv) is nn.Conv2d
    model.eval()
    fused = mmorepa.reparameterize(model)
    stock = registry.build(OREPAVGG.stock_cfg(cfg))
    stock.eval()
    stock.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(stock(x)[0], model(x)[0]) <= 1e-5


def test_mmpretrain_repvgg_checkpoints_load_into_orepavgg_repvgg():
    registry = toolbox_registry('mmpretrain')
    stock = randomize_network_(registry.build(dict(type='RepVGG', arch='A0')))
    ours = registry.build(dict(type='OREPAVGG', arch='A0', reparam='repvgg'))
    ours.load_state_dict(stock.state_dict(), strict=True)
    stock.switch_to_deploy()
    deployed = registry.build(dict(type='OREPAVGG', arch='A0', reparam='repvgg', deploy=True))
    deployed.load_state_dict(stock.state_dict(), strict=True)
    stock.eval(), ours.eval(), deployed.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours(x)[-1], stock(x)[-1]) <= 1e-5
        assert rel_err(deployed(x)[-1], stock(x)[-1]) <= 1e-5


def test_stem_lr_fragment_sets_a_tenth():
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile('configs/faster_rcnn_orepa_r50_1x_coco.py')
    registry = toolbox_registry('mmdet')
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
