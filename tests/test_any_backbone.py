"""``type='OREPA<Name>'`` on the backbone dict of a toolbox's own config (only the type changed):
the base class with OREPA layers in place of every plain k x k conv; fused, the base network; the
base's stock checkpoint seeds it exactly; a checkpoint of other branches is named layer by layer.
"""
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint

import mmorepa
from mmorepa.layers import ReparamConv2d
from mmorepa.ops import branches as B

from helpers import LogRecords, eval_features, randomize_network_, rel_err, toolbox_registry

def _small_hrnet(backbone):
    """HRNet with one module of one block per branch and a quarter of the widths."""
    extra = backbone.get('extra')
    if extra is None:  # mmpretrain's: an arch name
        from mmpretrain.models.backbones import HRNet
        keys = ('num_modules', 'num_branches', 'block', 'num_blocks', 'num_channels')
        extra = {f'stage{i}': dict(zip(keys, stage))
                 for i, stage in enumerate(HRNet.arch_zoo[backbone['arch']], 1)}
    extra = dict(extra)
    for name in ('stage1', 'stage2', 'stage3', 'stage4'):
        stage = dict(extra[name])
        n = stage['num_branches']
        extra[name] = dict(stage, num_modules=1, num_blocks=(1, ) * n,
                           num_channels=tuple(max(4, c // 4) for c in stage['num_channels']))
    return dict(backbone, extra=extra)


# (toolbox, the toolbox's own config under .mim/configs, overrides that shrink it for test time:
# ResNet-family widths to 16 channels (stem 32 where it is a 7x7), depth 101 -> 50, Res2Net 4
# scales, HRNet a quarter of the widths and one block per branch, RegNet one block per stage of
# widths 8, 16, 24, 40 in place of the 400MF arch)
NARROW = dict(stem_channels=16, base_channels=16)
SMALL_REGNET = dict(arch=dict(w0=8, wa=12.0, wm=1.5, group_w=8, depth=4, bot_mul=1.0))
NARROW_7X7 = dict(stem_channels=32, base_channels=16)
CASES = {
    'mmseg-ResNetV1c': ('mmseg', 'pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py', NARROW),
    'mmpretrain-ResNet_CIFAR': ('mmpretrain', 'resnet/resnet18_8xb16_cifar10.py', NARROW),
    'mmdet-ResNet-dcn': ('mmdet', 'dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py', NARROW_7X7),
    'mmpretrain-HRNet': ('mmpretrain', 'hrnet/hrnet-w18_4xb32_in1k.py', _small_hrnet),
    'mmdet-HRNet': ('mmdet', 'hrnet/faster-rcnn_hrnetv2p-w18-1x_coco.py', _small_hrnet),
    'mmseg-HRNet': ('mmseg', 'hrnet/fcn_hr18_4xb2-40k_cityscapes-512x1024.py', _small_hrnet),
    'mmpretrain-RegNet': ('mmpretrain', 'regnet/regnetx-400mf_8xb128_in1k.py', SMALL_REGNET),
    'mmdet-RegNet': ('mmdet', 'regnet/faster-rcnn_regnetx-400MF_fpn_ms-3x_coco.py',
                     SMALL_REGNET),
    'mmpretrain-Res2Net': ('mmpretrain', 'res2net/res2net50-w14-s8_8xb32_in1k.py',
                           dict(NARROW_7X7, scales=4)),
    'mmdet-Res2Net': ('mmdet', 'res2net/faster-rcnn_res2net-101_fpn_2x_coco.py',
                      dict(NARROW_7X7, depth=50, scales=4)),
    'mmpretrain-ResNeSt': ('mmpretrain', 'resnest/resnest50_32xb64_in1k.py', NARROW),
    'mmdet-ResNeSt': ('mmdet',
                      'resnest/faster-rcnn_s50_fpn_syncbn-backbone+head_ms-range-1x_coco.py',
                      NARROW),
    'mmseg-ResNeSt': ('mmseg', 'resnest/resnest_s101-d8_pspnet_4xb2-80k_cityscapes512x1024.py',
                      dict(NARROW, depth=50)),
}
OTHER_BRANCHES = dict(branches=B.names((B.KXK, B.ONE_BY_ONE, B.ONE_BY_ONE_KXK)))


def base_backbone(toolbox, config, overrides=()):
    """The backbone dict of the toolbox's own config (installed under ``.mim/configs``)."""
    root = Path(importlib.util.find_spec(toolbox).origin).parent / '.mim' / 'configs'
    cfg = Config.fromfile(str(root / config))
    backbone = cfg.model.backbone.to_dict()
    backbone.pop('init_cfg', None)
    return overrides(backbone) if callable(overrides) else dict(backbone, **dict(overrides))


def _plain_kxk_outside_conv_ops(model):
    ops = [n + '.' for n, m in model.named_modules() if n and type(m) is not nn.Conv2d and (
        isinstance(m, ReparamConv2d) or isinstance(m._parameters.get('weight'), nn.Parameter)
        and hasattr(m, 'kernel_size'))]
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d
            and max(m.kernel_size) > 1 and not any(n.startswith(op) for op in ops)]


def _outer_reparam_layers(model):
    names = [n for n, m in model.named_modules() if isinstance(m, ReparamConv2d)]
    return [n for n in names if not any(n.startswith(o + '.') for o in names)]


def _save(model, path):
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return str(path)


@pytest.mark.parametrize('case', list(CASES))
def test_orepa_form_of_a_toolbox_backbone(case, tmp_path):
    toolbox, config, overrides = CASES[case]
    torch.manual_seed(0)
    registry = toolbox_registry(toolbox)
    base = base_backbone(toolbox, config, overrides)
    orepa = dict(base, type='OREPA' + base['type'])
    size = 96 if 'dcn' in case else 32  # DCN: the last maps must be as large as its kernel
    x = torch.randn(1, 3, size, size)

    # the base class, every plain k x k conv re-parameterizable (convs inside a conv op aside)
    model = registry.build(orepa)
    stock_cls = registry.get(base['type'])
    assert isinstance(model, stock_cls) and stock_cls.__module__.startswith(toolbox)
    assert _plain_kxk_outside_conv_ops(model) == []
    assert _outer_reparam_layers(model)

    # fused: loads strictly into the base class built from the same dict, same features
    randomize_network_(model)
    with torch.no_grad(), mmorepa.unfused_eval(model):
        ref = eval_features(model, x)
    model.eval()  # mmpretrain's / mmseg's ResNet.train() returns None: no chaining
    fused = mmorepa.reparameterize(model)
    stock = registry.build(base)
    stock.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(eval_features(stock, x), ref) <= 1e-5

    # the base's stock checkpoint through init_cfg=Pretrained: the stock features, one line a layer
    stock = randomize_network_(registry.build(base))
    model.init_cfg = dict(type='Pretrained', checkpoint=_save(stock, tmp_path / 'stock.pth'))
    model._is_init = False  # the model as built from dict(orepa, init_cfg=...)
    with LogRecords() as log:
        model.init_weights()
    lines = [m for m in log.messages if 'seeded from a plain' in m]
    assert len(lines) == len(_outer_reparam_layers(model))
    assert all('NOT exact' not in m for m in lines)
    with torch.no_grad():
        assert rel_err(eval_features(model, x), eval_features(stock.double(), x.double())) <= 1e-5

    # a checkpoint of other OREPA branches: named, layer by layer, with the differing keys
    other = registry.build(dict(orepa, orepa_cfg=OTHER_BRANCHES))
    path = _save(other, tmp_path / 'other.pth')
    with LogRecords() as log:
        load_checkpoint(model, path, strict=False, logger='current')
    layer = next(n for n in _outer_reparam_layers(model)
                 if B.DW_PW.name in getattr(model.get_submodule(n), 'branches', ()))
    assert f'{layer} (OREPAConv2d): the checkpoint\'s entries' in log.text()
    assert 'weight_dw' in log.text()


def test_deploy_config_and_deploy_true_give_the_base_network():
    from mmorepa.deploy import deploy_config
    registry = toolbox_registry('mmseg')
    base = base_backbone('mmseg', CASES['mmseg-ResNetV1c'][1])
    cfg = Config(dict(default_scope='mmseg', custom_imports=dict(imports=['mmorepa']),
                      model=dict(type='EncoderDecoder', backbone=dict(
                          base, type='OREPAResNetV1c', init_cfg=dict(
                              type='Pretrained', checkpoint='open-mmlab://resnet50_v1c')))))
    deployed = deploy_config(cfg)
    assert deployed.model.backbone == base and 'custom_imports' not in deployed
    direct = registry.build(dict(base, type='OREPAResNetV1c', deploy=True))
    assert not any(isinstance(m, ReparamConv2d) for m in direct.modules())
    assert set(direct.state_dict()) == set(registry.build(base).state_dict())


def test_kept_plain_convs_are_named_and_bad_requests_fail_in_one_line():
    registry = toolbox_registry('mmpretrain')
    base = base_backbone('mmpretrain', CASES['mmpretrain-ResNet_CIFAR'][1])
    # a conv that cannot be re-parameterized (reflect padding) stays plain, named in one line
    with LogRecords() as log:
        model = registry.build(dict(base, type='OREPAResNet_CIFAR', reparam='dbb'))
    assert not [m for m in log.messages if 'kept plain' in m]
    from mmorepa.models.backbones.reparam_backbone import reparam_class, swap_convs_
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode='reflect'), nn.BatchNorm2d(8),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    kept = []
    assert swap_convs_(net, dict(type='OREPA'), kept=kept) == ['2']
    assert kept == ["0 (padding_mode='reflect': only zero padding squeezes exactly)"]
    # a DBB block whose bias no norm can take stays plain (it could not fuse into the base)
    kept = []
    swap_convs_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU()),
                dict(type='DBB'),
                kept=kept)
    assert len(kept) == 1 and 'no BatchNorm after it' in kept[0]
    # the type of another toolbox, a wrong argument, conv_cfg with reparam: one line each
    toolbox_registry('mmdet')
    with pytest.raises(ValueError, match="mmdet has no backbone 'ResNet_CIFAR'"):
        registry.build(dict(base, type='OREPAResNet_CIFAR'))
    toolbox_registry('mmpretrain')
    with pytest.raises(TypeError, match="ResNet_CIFAR takes no argument 'typo_arg'"):
        registry.build(dict(base, type='OREPAResNet_CIFAR', typo_arg=1))
    with pytest.raises(ValueError, match="conv_cfg=.* both choose the convs"):
        registry.build(dict(base, type='OREPAResNet_CIFAR', conv_cfg=dict(type='DBB')))
    assert isinstance(model, reparam_class(registry.get('ResNet_CIFAR')))


def test_names_resolve_lazily_in_each_scope():
    """``import mmorepa`` imports no toolbox; a name resolves in whichever scope builds it."""
    code = ('import sys, mmorepa; from mmengine.registry import MODELS; '
            'print(sorted({"mmdet", "mmseg", "mmpretrain"} & set(sys.modules)), '
            'MODELS.get("OREPAResNetV1c").__name__, MODELS.get("OREPAHRNet").__name__)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['[]', 'OREPAResNetV1c', 'OREPAHRNet']
    for toolbox in ('mmpretrain', 'mmdet', 'mmseg'):
        registry = toolbox_registry(toolbox)
        model = registry.build(dict(type='OREPAHRNet', extra=_HRNET_TINY))
        assert type(model).__mro__[2] is registry.get('HRNet')
        assert type(model).__mro__[2].__module__.startswith(toolbox)


_HRNET_TINY = dict(
    stage1=dict(num_modules=1, num_branches=1, block='BOTTLENECK', num_blocks=(1, ),
                num_channels=(8, )),
    stage2=dict(num_modules=1, num_branches=2, block='BASIC', num_blocks=(1, 1),
                num_channels=(4, 8)),
    stage3=dict(num_modules=1, num_branches=3, block='BASIC', num_blocks=(1, 1, 1),
                num_channels=(4, 8, 16)),
    stage4=dict(num_modules=1, num_branches=4, block='BASIC', num_blocks=(1, 1, 1, 1),
                num_channels=(4, 8, 16, 32)))


def teardown_module():
    DefaultScope._instance_dict.clear()


ANY = sorted((Path(__file__).resolve().parents[1] / 'configs' / 'any').glob('*.py'))


@pytest.mark.parametrize('path', ANY, ids=[p.stem for p in ANY])
def test_two_line_configs_keep_the_base_and_deploy_to_it(path):
    """configs/any/: the base config's backbone dict with only the type changed; its deploy
    config is the base config's backbone (the base type, no mmorepa)."""
    from mmorepa.deploy import deploy_config
    cfg = Config.fromfile(str(path))
    base = re.search(r"^_base_ = '(\w+)::(.+)'$", path.read_text(), re.M)
    stock = base_backbone(base.group(1), base.group(2))
    ours = cfg.model.backbone.to_dict()
    assert ours.pop('type') == 'OREPA' + stock.pop('type')
    ours.pop('init_cfg', None)
    assert ours == stock
    deployed = deploy_config(cfg)
    assert 'custom_imports' not in deployed
    assert deployed.model.backbone.to_dict() == base_backbone(base.group(1), base.group(2))
