"""``OREPA<Name>`` for every conv that computes as a plain conv, every scope and every registered
class: mmcv's ``Conv2dAdaptivePadding`` (EfficientNet) and ``Conv2d`` wrapper (VAN, DaViT), and
string padding (ConvMixer's ``'same'``) become re-parameterizable and fuse back into their own
class and padding; the deploy config takes the fused weights (RepLKNet); a scoped model type
builds its own toolbox's class; a class the user registers has an OREPA name; a name that cannot
build says why."""
import importlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope, Registry, init_default_scope

import mmorepa
from mmorepa.deploy import deploy_config
from mmorepa.layers import ReparamConv2d
from mmorepa.models.backbones.reparam_backbone import ReparamBackboneMixin, swap_convs_

from helpers import randomize_network_, rel_err

ROOT = Path(__file__).resolve().parents[1]


def _scope(toolbox):
    init_default_scope(toolbox)
    return importlib.import_module(f'{toolbox}.registry').MODELS


def _features(model, x):
    out = model(x)
    return torch.cat([o.flatten() for o in (out if isinstance(out, (tuple, list)) else [out])])


def _train_step(model, x):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    _features(model, x).square().mean().backward()
    opt.step()
    model.eval()


def _fuses_into_stock(registry, cfg, x):
    """Build ``cfg`` (an OREPA<Name>), train a step, fuse; the deploy config's model takes the
    fused weights strictly and computes the un-fused features (float64 reference)."""
    model = randomize_network_(registry.build(cfg))
    _train_step(model, x)
    with torch.no_grad(), mmorepa.unfused_eval(model):
        reference = _features(model.double(), x.double())
    model.float()
    fused = mmorepa.reparameterize(model)
    stock = registry.build(deploy_config(Config(dict(default_scope=registry.scope,
                                                      model=cfg))).model)
    stock.load_state_dict(fused.state_dict(), strict=True)
    stock.eval()
    with torch.no_grad():
        assert rel_err(_features(stock, x), reference) <= 1e-5
    return model, fused, stock


@pytest.mark.parametrize('toolbox', ['mmpretrain', 'mmdet'])
def test_efficientnet_adaptive_padding_convs_are_reparameterized(toolbox):
    torch.manual_seed(0)
    registry = _scope(toolbox)
    cfg = dict(type='OREPAEfficientNet', arch='b0', out_indices=(6, ))
    stock_convs = {n for n, m in registry.build(dict(cfg, type='EfficientNet')).named_modules()
                   if type(m) is Conv2dAdaptivePadding and m.kernel_size[0] > 1}
    assert len(stock_convs) > 10
    x = torch.randn(2, 3, 33, 31)  # odd sides: uneven 'same' padding at stride 2
    model, fused, stock = _fuses_into_stock(registry, cfg, x)
    layers = {n for n, m in model.named_modules() if isinstance(m, ReparamConv2d)}
    assert stock_convs <= layers
    assert all(model.get_submodule(n).stock_conv_class is Conv2dAdaptivePadding
               and model.get_submodule(n).padding == (0, 0) for n in stock_convs)
    # fused: the stock network, each conv of its own class
    fused_types = {n: type(m) for n, m in fused.named_modules() if n in stock_convs}
    assert set(fused_types.values()) == {Conv2dAdaptivePadding}
    assert type(stock) is registry.get('EfficientNet')


@pytest.mark.parametrize('name,arch', [
    ('VAN', dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], ffn_ratios=[2, 2, 2, 2])),
    ('DaViT', dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]))])
def test_mmcv_conv2d_wrapper_is_reparameterized_and_fuses_back(name, arch):
    torch.manual_seed(1)
    registry = _scope('mmpretrain')
    cfg = dict(type=f'OREPA{name}', arch=arch)
    if name == 'DaViT':
        cfg['window_size'] = 2
    stock = registry.build(dict(cfg, type=name))
    wrapped = {n for n, m in stock.named_modules() if type(m) is MMCVConv2d
               and m.kernel_size[0] > 1}
    assert wrapped
    model, fused, _ = _fuses_into_stock(registry, cfg, torch.randn(2, 3, 64, 64))
    assert all(isinstance(model.get_submodule(n), ReparamConv2d) for n in wrapped)
    assert all(type(fused.get_submodule(n)) is MMCVConv2d for n in wrapped)


def test_string_padding_convs_are_reparameterized_and_keep_their_padding():
    """ConvMixer's depthwise k x k conv has ``padding='same'``: re-parameterized, fused back
    into a conv with ``padding='same'``; ``'valid'`` and a dilated ``'same'`` pad their zeros."""
    torch.manual_seed(3)
    registry = _scope('mmpretrain')
    cfg = dict(type='OREPAConvMixer', arch=dict(embed_dims=16, depth=1, patch_size=4,
                                                kernel_size=9))
    same = {n for n, m in registry.build(dict(cfg, type='ConvMixer')).named_modules()
            if isinstance(m, nn.Conv2d) and m.padding == 'same'}
    assert same
    model, fused, _ = _fuses_into_stock(registry, cfg, torch.randn(2, 3, 32, 32))
    assert all(isinstance(model.get_submodule(n), ReparamConv2d) for n in same)
    assert all(type(fused.get_submodule(n)) is nn.Conv2d
               and fused.get_submodule(n).padding == 'same' for n in same)
    net = nn.Sequential(nn.Conv2d(4, 8, 5, padding='valid', bias=False), nn.BatchNorm2d(8),
                        nn.Conv2d(8, 8, 3, padding='same', dilation=2, bias=False),
                        nn.BatchNorm2d(8))
    stock_paddings = [net[0].padding, net[2].padding]
    assert swap_convs_(net, dict(type='OREPA'), kept=[]) == ['0', '2']
    assert (net[0].padding, net[2].padding) == ((0, 0), (2, 2))
    kept = []
    swap_convs_(nn.Sequential(nn.Conv2d(8, 8, 4, padding='same')), dict(type='OREPA'), kept=kept)
    assert kept == ["0 (padding='same' with kernel_size (4, 4) and dilation (1, 1) pads one "
                    "side more than the other)"]
    net = pickle.loads(pickle.dumps(randomize_network_(net).double().eval()))
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    with torch.no_grad(), mmorepa.unfused_eval(net):
        reference = net(x)
    fused = mmorepa.reparameterize(net)
    assert [fused[0].padding, fused[2].padding] == stock_paddings
    assert all(type(fused[i]) is nn.Conv2d for i in (0, 2))
    with torch.no_grad():
        assert rel_err(fused(x), reference) <= 1e-12


def test_replknet_deploy_config_takes_the_fused_weights():
    torch.manual_seed(2)
    registry = _scope('mmpretrain')
    cfg = dict(type='OREPARepLKNet', arch=dict(
        large_kernel_sizes=[7, 7, 5, 5], layers=[1, 1, 1, 1], channels=[8, 16, 16, 16],
        small_kernel=3, dw_ratio=1))
    assert deploy_config(Config(dict(default_scope='mmpretrain', model=cfg))).model \
        .small_kernel_merged is True
    _fuses_into_stock(registry, cfg, torch.randn(2, 3, 64, 64))


def _no_default_scope():
    DefaultScope._instance_dict.clear()
    assert DefaultScope.get_current_instance() is None


def test_a_scoped_model_type_builds_its_own_toolbox_backbone():
    _no_default_scope()
    dcn = dict(dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
               stage_with_dcn=(False, True, False, False))
    retinanet = Config.fromfile(
        str(Path(importlib.import_module('mmdet').__file__).parent / '.mim' / 'configs' /
            'retinanet' / 'retinanet_r50_fpn_1x_coco.py')).model.to_dict()
    model_cfg = dict(retinanet, type='mmdet.RetinaNet', data_preprocessor=None,
                     backbone=dict(type='OREPAResNet', depth=50, base_channels=8, init_cfg=None,
                                   **dcn),
                     neck=dict(retinanet['neck'], in_channels=[32, 64, 128, 256]))
    model = MODELS.build(model_cfg)
    from mmdet.models.backbones import ResNet as MMDetResNet
    assert isinstance(model.backbone, MMDetResNet)
    assert isinstance(model.backbone, ReparamBackboneMixin)
    deployed = deploy_config(Config(dict(model=model_cfg))).model
    assert deployed.backbone.type == 'ResNet' and deployed.backbone.dcn == dcn['dcn']
    _no_default_scope()
    stock = MODELS.build(deployed)
    assert type(stock.backbone) is MMDetResNet
    model.eval()
    stock.load_state_dict(mmorepa.reparameterize(model).state_dict(), strict=True)


class _UserNet(nn.Module):
    """A user's backbone: a 3x3 conv (with BN) and a 5x5 conv."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Conv2d(channels, channels, 5, padding=2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_a_class_registered_by_the_user_has_an_orepa_name():
    registry = _scope('mmdet')
    registry.build(dict(type='ResNet', depth=18))  # the toolbox's models are imported
    name = 'UserNetForOREPANames'
    user_cls = type(name, (_UserNet, ), {})
    registry.register_module(module=user_cls)
    model = registry.build(dict(type=f'OREPA{name}', channels=8))
    assert isinstance(model, user_cls) and isinstance(model, ReparamBackboneMixin)
    assert isinstance(model.conv, ReparamConv2d) and isinstance(model.head, ReparamConv2d)
    deployed = deploy_config(Config(dict(default_scope='mmdet', model=dict(
        type=f'OREPA{name}', channels=8)))).model
    assert deployed == dict(type=name, channels=8)
    # in a registry of the user's own, below mmengine's MODELS, too
    own = Registry('model', parent=MODELS, scope='mmorepa_user_scope')
    own.register_module(module=type('OwnNet', (_UserNet, ), {}))
    _no_default_scope()
    assert isinstance(own.build(dict(type='OREPAOwnNet')).conv, ReparamConv2d)
    # a class the user registers under a name we gave replaces ours, as without mmorepa
    _scope('mmdet')
    replacement = type('ReplacesOurs', (_UserNet, ), {})
    registry.register_module(name=f'OREPA{name}', module=replacement)
    assert registry.get(f'OREPA{name}') is replacement


def test_exported_but_unregistered_backbone_says_why():
    registry = _scope('mmpretrain')
    with pytest.raises(ValueError, match='exports CSPNet without registering it'):
        registry.build(dict(type='OREPACSPNet', arch=dict()))


def test_layers_standing_in_for_stock_convs_pickle_across_processes(tmp_path):
    _scope('mmpretrain')
    model = MODELS.build(dict(type='OREPAVAN', arch=dict(
        embed_dims=[8, 8, 8, 8], depths=[1, 1, 1, 1], ffn_ratios=[1, 1, 1, 1])))
    torch.save(model, tmp_path / 'model.pth')
    code = ('import torch; from mmcv.cnn.bricks.wrappers import Conv2d; '
            f'm = torch.load({str(tmp_path / "model.pth")!r}, weights_only=False); '
            'import mmorepa; f = mmorepa.reparameterize(m); '
            'print(type(m).__name__, sum(type(c) is Conv2d for c in f.modules()) > 0)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['OREPAVAN', 'True']


def teardown_module():
    DefaultScope._instance_dict.clear()
