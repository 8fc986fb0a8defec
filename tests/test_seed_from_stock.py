"""OREPA training started from a stock checkpoint, exactly: every OREPA layer takes the plain
conv's weight (its squeezed kernel equals it), so the OREPA model computes the stock model's
function; no branch is dead (two SGD steps move every parameter)."""

import pytest
import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmengine.runner import load_checkpoint

import mmorepa
from mmorepa.layers import OREPAConv1x1, OREPAConv2d, OREPALargeConv, ReparamConv2d
from mmorepa.ops import branches as B

from helpers import (LogRecords, eval_features, randomize_, randomize_network_, rel_err,
                     toolbox_registry)

TOOLBOXES = ['mmpretrain', 'mmdet', 'mmseg']
ALL_STAGES = dict(out_indices=(0, 1, 2, 3))


def _save(model, path):
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)
    return str(path)


def _eval(model):
    model.eval()  # mmpretrain's ResNet.train() returns None: no chaining
    return model


def _stock_reference(stock, x):
    """The stock model's features in float64 (plain convs: independent of OREPA's code)."""
    ref = _eval(stock.double())
    with torch.no_grad():
        out = eval_features(ref, x.double())
    stock.float()
    return out


def _two_steps_move_every_parameter(model, x):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        sum(o.square().mean() for o in model(x)).backward()
        opt.step()
    still = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not still, f'parameters that two SGD steps did not move: {still[:5]}'


def _assert_seeded_every_layer(model, log):
    layers = [n for n, m in model.named_modules()
              if isinstance(m, ReparamConv2d) and '.generators.' not in n]
    seeded = [m for m in log.messages if 'seeded from a plain' in m]
    assert len(seeded) == len(layers) and all('exact' in m and 'NOT' not in m for m in seeded)
    assert not any('do not match exactly' in m or 'missing keys' in m for m in log.messages)


# every toolbox's ResNet at depth 18 (basic blocks); the bottleneck's 1x1 layers at depth 50 once
@pytest.mark.parametrize('toolbox,depth', [(t, 18) for t in TOOLBOXES] + [('mmpretrain', 50)])
def test_stock_checkpoint_seeds_orepa_resnet_exactly(toolbox, depth, tmp_path):
    torch.manual_seed(depth)
    registry = toolbox_registry(toolbox)
    stock = randomize_network_(registry.build(dict(type='ResNet', depth=depth, **ALL_STAGES)))
    path = _save(stock, tmp_path / 'stock.pth')
    model = registry.build(dict(type='OREPAResNet', depth=depth, **ALL_STAGES,
                                init_cfg=dict(type='Pretrained', checkpoint=path)))
    assert isinstance(model.conv1, OREPALargeConv)  # the linear deep stem is seeded too
    with LogRecords() as log:
        model.init_weights()
    _assert_seeded_every_layer(model, log)
    x = torch.randn(2, 3, 64, 64)
    ref = _stock_reference(stock, x)
    with torch.no_grad():
        assert rel_err(eval_features(_eval(model), x), ref) <= 1e-5
        with mmorepa.unfused_eval(model):  # squeeze -> conv -> norm on feature maps
            assert rel_err(eval_features(model, x), ref) <= 1e-5
    _two_steps_move_every_parameter(model, x)


def _stock_classifier(seed):
    """An mmpretrain ImageClassifier with a stock ResNet-50 (random weights, BN statistics): a
    stand-in for mmpretrain's resnet50_8xb32_in1k."""
    torch.manual_seed(seed)
    return randomize_network_(toolbox_registry('mmpretrain').build(dict(
        type='ImageClassifier', backbone=dict(type='ResNet', depth=50),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=1000, in_channels=2048))))


def test_classifier_checkpoint_seeds_a_detector_backbone_with_prefix(tmp_path):
    classifier = _stock_classifier(2)
    path = _save(classifier, tmp_path / 'classifier.pth')
    registry = toolbox_registry('mmdet')
    backbone = registry.build(dict(type='OREPAResNet', depth=50, init_cfg=dict(
        type='Pretrained', checkpoint=path, prefix='backbone.')))
    with LogRecords() as log:
        backbone.init_weights()
    _assert_seeded_every_layer(backbone, log)
    x = torch.randn(2, 3, 64, 64)
    ref = _stock_reference(classifier.backbone, x)  # mmpretrain: the last stage only
    with torch.no_grad():
        assert rel_err(_eval(backbone)(x)[-1].flatten(), ref) <= 1e-5
    _two_steps_move_every_parameter(backbone, x)


STOCK_START = ['faster_rcnn_orepa_r50_stock-in1k_1x_coco.py',
               'retinanet_orepa_r50_stock-in1k_1x_coco.py',
               'pspnet_orepa_r50-d8_stock-in1k_40k_cityscapes.py',
               'deeplabv3plus_orepa_r50-d8_stock-in1k_40k_cityscapes.py']


@pytest.fixture(scope='module')
def stock_classifier_checkpoint(tmp_path_factory):
    return _save(_stock_classifier(6), tmp_path_factory.mktemp('in1k') / 'resnet50_in1k.pth')


@pytest.mark.parametrize('config', STOCK_START)
def test_stock_start_configs_seed_every_layer(config, stock_classifier_checkpoint):
    from mmengine.config import Config
    from mmorepa.deploy import deploy_config
    cfg = Config.fromfile(f'configs/{config}')
    assert cfg.model.backbone.init_cfg.checkpoint.endswith('resnet50_8xb32_in1k_20210831-ea4938fc.pth')
    init_cfg = dict(cfg.model.backbone.init_cfg, checkpoint=stock_classifier_checkpoint)
    registry = toolbox_registry(cfg.default_scope)
    model = registry.build(dict(cfg.model.backbone, init_cfg=init_cfg))
    with LogRecords() as log:
        model.init_weights()
    _assert_seeded_every_layer(model, log)
    # the same config's stock backbone (its deploy form) from the same checkpoint
    stock = registry.build(dict(deploy_config(cfg).model.backbone, init_cfg=init_cfg))
    stock.init_weights()
    x = torch.randn(1, 3, 64, 64)
    ref = _stock_reference(stock, x)
    with torch.no_grad():
        assert rel_err(eval_features(_eval(model), x), ref) <= 1e-5


def test_stock_repvgg_seeds_orepavgg(tmp_path):
    """Through mmengine's load_checkpoint (``load_from``): mmpretrain's RepVGG hands a backbone
    ``init_cfg`` down to every block, so a backbone-level Pretrained init does not fit even the
    stock RepVGG; a classifier-level one, or load_from, does."""
    torch.manual_seed(3)
    registry = toolbox_registry('mmpretrain')
    stock = randomize_network_(registry.build(dict(type='RepVGG', arch='A0')))
    path = _save(stock, tmp_path / 'repvgg.pth')
    model = registry.build(dict(type='OREPAVGG', arch='A0', reparam='orepa'))
    with LogRecords() as log:
        load_checkpoint(model, path, strict=False, logger='current')
    _assert_seeded_every_layer(model, log)
    x = torch.randn(2, 3, 64, 64)
    ref = _stock_reference(stock, x)
    with torch.no_grad():
        assert rel_err(eval_features(_eval(model), x), ref) <= 1e-5
    _two_steps_move_every_parameter(model, x)


def test_fused_deploy_checkpoint_resumes_orepa_training(tmp_path):
    """load_from / mmengine's load_checkpoint of a fused (stock) checkpoint: same function."""
    torch.manual_seed(4)
    registry = toolbox_registry('mmdet')
    trained = _eval(randomize_network_(registry.build(dict(type='OREPAResNet', depth=18,
                                                           **ALL_STAGES))))
    fused = mmorepa.reparameterize(trained)
    path = _save(fused, tmp_path / 'fused.pth')
    model = registry.build(dict(type='OREPAResNet', depth=18, **ALL_STAGES))
    with LogRecords() as log:
        load_checkpoint(model, path, strict=True)
    _assert_seeded_every_layer(model, log)
    x = torch.randn(2, 3, 64, 64)
    ref = _stock_reference(fused, x)
    with torch.no_grad():
        assert rel_err(eval_features(_eval(model), x), ref) <= 1e-5


@pytest.mark.parametrize('make', [
    lambda: OREPAConv2d(8, 16, 3, stride=2, groups=4),
    lambda: OREPAConv2d(6, 6, 5, dilation=2, scaling='scalar'),
    lambda: OREPAConv2d(4, 8, 3, branches=B.names((B.KXK, B.DW_PW)), scaling='none', bias=True),
    lambda: OREPAConv1x1(8, 4, stride=2),
    lambda: OREPALargeConv(3, 27, 7, stride=2),
    lambda: OREPALargeConv(2, 18, 5),
])
def test_layer_squeezes_to_the_loaded_plain_weight(make):
    torch.manual_seed(5)
    layer = randomize_(make())
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, bias=layer.bias is not None)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.load_state_dict(conv.state_dict(), strict=True)
    kernel, bias = layer.double().squeezed_kernel_and_bias()
    assert rel_err(kernel, conv.weight) <= 1e-5
    if bias is not None:
        assert torch.allclose(bias.float(), conv.bias)
    # the kxk (1x1) branch absorbed the difference; every other branch kept its own values
    changed = {k for k, v in layer.state_dict().items() if not torch.equal(v.float(), before[k])}
    absorbing = 'weight_1x1' if isinstance(layer, OREPAConv1x1) else 'weight_kxk'
    assert changed and all(k.endswith(absorbing) or k.endswith('bias') for k in changed)
    x = torch.randn(2, layer.in_channels, 11, 11)
    with torch.no_grad():
        assert rel_err(_eval(layer.float())(x), conv(x)) <= 1e-5


@pytest.mark.parametrize('make', [lambda: OREPAConv2d(4, 8, 3, stride=2, groups=2),
                                  lambda: OREPAConv2d(6, 6, 5, dilation=2, scaling='scalar')])
def test_seeded_layer_equals_the_plain_conv_branch_by_branch(make):
    """Independent of the squeeze: the branches computed one by one on feature maps (float64)."""
    from helpers import orepa_explicit
    torch.manual_seed(7)
    layer = randomize_(make())
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                     layer.padding, layer.dilation, layer.groups, bias=False)
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, layer.in_channels, 13, 13, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(orepa_explicit(layer.double(), x), conv.double()(x)) <= 1e-5


def test_layers_that_cannot_be_seeded_report_it_and_do_not_stop_the_load():
    from mmengine.runner.checkpoint import load_state_dict
    without_kxk = B.names((B.ONE_BY_ONE, B.ONE_BY_ONE_KXK))
    model = nn.Sequential(OREPAConv2d(4, 8, 3, branches=without_kxk), nn.Conv2d(8, 8, 1))
    plain = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.Conv2d(8, 8, 1))
    with pytest.raises(RuntimeError, match="without a 'kxk' branch"):
        model.load_state_dict(plain.state_dict())
    with LogRecords() as log:
        load_state_dict(model, plain.state_dict(), strict=False, logger='current')
    assert "without a 'kxk' branch" in log.text()
    assert torch.equal(model[1].weight, plain[1].weight)  # the rest still loaded


def test_other_models_checkpoints_are_never_half_loaded_silently(tmp_path):
    registry = toolbox_registry('mmpretrain')
    r50 = _save(registry.build(dict(type='ResNet', depth=50)), tmp_path / 'r50.pth')
    model = registry.build(dict(type='OREPAResNet', depth=18,
                                init_cfg=dict(type='Pretrained', checkpoint=r50)))
    with LogRecords() as log:
        model.init_weights()
    text = log.text()
    assert 'do not match exactly' in text and 'size mismatch for layer1.0.conv1.weight' in text
    # a stem narrower than 9 x 3 input channels: the seed kernel takes what the 3x3s cannot
    narrow = registry.build(dict(type='ResNet', depth=18, stem_channels=16, base_channels=16))
    path = _save(randomize_network_(narrow), tmp_path / 'narrow.pth')
    model = registry.build(dict(type='OREPAResNet', depth=18, stem_channels=16,
                                base_channels=16, init_cfg=dict(type='Pretrained',
                                                                checkpoint=path)))
    with LogRecords() as log:
        model.init_weights()
    stem = [m for m in log.messages if m.startswith('conv1 (OREPALargeConv)')]
    assert len(stem) == 1 and 'squeezed kernel exact (relative error' in stem[0]
    assert rel_err(model.conv1.squeezed_kernel_and_bias()[0], narrow.conv1.weight) <= 1e-6
    # and a plain-conv checkpoint does not go into a layer whose shape differs
    layer = OREPAConv2d(4, 8, 3)
    with pytest.raises(RuntimeError, match='size mismatch for weight'):
        layer.load_state_dict(nn.Conv2d(4, 8, 5).state_dict())


def teardown_module():
    DefaultScope._instance_dict.clear()
