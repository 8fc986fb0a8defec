"""Plain convs of an OREPA backbone (mmcv's deformable convs, a fused network's convs) start from
the fused kernel of the re-parameterized layer whose branches a checkpoint holds in their place;
a backbone conv left at its initialisation is named, one line per conv."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.registry import init_default_scope

import mmorepa  # noqa: F401  (registers the layers and backbones)
from mmorepa.layers import DiverseBranchBlock, OREPAConv2d
from mmorepa.models.backbones.branch_seeding import matching_layer
from mmorepa.ops import branches as B

from helpers import LogRecords, bn_eval, orepa_explicit, randomize_, rel_err

DCN_CONFIG = 'configs/faster_rcnn_orepa_r50-dconv-c3-c5_1x_coco.py'
IMAGENET_CONFIG = 'configs/imagenet/orepa-resnet50_4xb64-120e_in1k.py'
# depth 50 with fewer blocks and channels: the DCN config's structure (deformable c3-c5)
SMALL = dict(stage_blocks=(1, 2, 1, 1), stem_channels=32, base_channels=16)
LEFT = 'left at its initialisation'


def _scope(toolbox):
    init_default_scope(toolbox)
    return importlib.import_module(f'{toolbox}.registry').MODELS


def _imagenet_checkpoint(path, **backbone):
    """An un-fused ImageNet classifier of IMAGENET_CONFIG at SMALL widths with random weights
    and BN statistics, saved as the ImageNet run saves it; returns the classifier."""
    cfg = Config.fromfile(IMAGENET_CONFIG).model
    cfg.backbone.update(SMALL, **backbone)
    cfg.head.in_channels = SMALL['base_channels'] * 32
    model = _scope('mmpretrain').build(cfg)
    randomize_(model, torch.Generator().manual_seed(0))
    torch.save(dict(meta=dict(epoch=120), state_dict=model.state_dict()), path)
    return model.eval()


def _dcn_backbone(checkpoint, **overrides):
    """The DCN config's backbone at SMALL widths, its init_cfg pointed at ``checkpoint``."""
    cfg = Config.fromfile(DCN_CONFIG).model.backbone
    cfg.update(SMALL, **overrides)
    cfg.init_cfg.checkpoint = str(checkpoint)
    return _scope('mmdet').build(cfg)


def _deform_convs(model):
    from mmcv.ops import DeformConv2dPack
    return {n: m for n, m in model.named_modules() if isinstance(m, DeformConv2dPack)}


def _as_conv(x, deform):
    w = deform.weight.double()
    return F.conv2d(x, w, None, deform.stride, deform.padding, deform.dilation, deform.groups)


def test_deformable_convs_take_the_squeezed_kernel_of_the_imagenet_checkpoint(tmp_path):
    path = tmp_path / 'orepa-resnet50_in1k.pth'
    imagenet = _imagenet_checkpoint(path).backbone
    model = _dcn_backbone(path)
    with LogRecords() as log:
        model.init_weights()
    deform = _deform_convs(model)
    assert len(deform) == 4  # stages c3-c5: 2 + 1 + 1 blocks
    x = torch.randn(2, SMALL['base_channels'] * 8, 9, 9, dtype=torch.float64)
    for name, conv in deform.items():
        source = copy.deepcopy(imagenet.get_submodule(name)).double()
        assert isinstance(source, OREPAConv2d)
        xs = x[:, :conv.in_channels]
        # the branches on feature maps in float64 (Fig. 6), against the conv of the loaded kernel
        assert rel_err(_as_conv(xs, conv), orepa_explicit(source, xs)) <= 1e-6, name
        assert f'{name} (DeformConv2dPack): seeded with the fused kernel' in log.text()
        # the deformable conv itself, at its zero initial offsets, computes that conv
        with torch.no_grad():
            out = conv(xs.float())
        assert rel_err(out, orepa_explicit(source, xs)) <= 1e-5, name
    assert LEFT not in log.text()
    # the OREPA layers took their own entries
    source = imagenet.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith(tuple(deform)):
            assert torch.equal(value, source[key]), key


def test_a_conv_left_at_its_init_is_named_in_one_line(tmp_path):
    path = tmp_path / 'partial.pth'
    _imagenet_checkpoint(path)
    ckpt = torch.load(path)
    state = ckpt['state_dict']
    for key in [k for k in state if k.startswith(('backbone.layer3.0.conv2.',
                                                  'backbone.layer2.1.conv1.'))]:
        del state[key]
    # entries of no layer of that geometry (a 1x1 branch 3 channels too wide)
    state[f'backbone.layer4.0.conv2.{B.ONE_BY_ONE.leaves[0].attr}'] = torch.zeros(128, 131, 1, 1)
    torch.save(ckpt, path)
    held = ', '.join(sorted(['scales'] + [a for b in B.OREPA_BRANCHES for a in b.attrs()]))
    model = _dcn_backbone(path)
    with LogRecords() as log:
        model.init_weights()
    lines = [line for line in log.text().splitlines() if LEFT in line]
    assert lines == [
        f'layer2.1.conv1 (OREPAConv1x1): not in the checkpoint; {LEFT}',
        f'layer3.0.conv2 (DeformConv2dPack): not in the checkpoint; {LEFT}',
        f'layer4.0.conv2 (DeformConv2dPack): the checkpoint holds {held} here: no '
        f're-parameterized layer of its geometry (128, 128, 3, 3) has these entries; {LEFT}']
    assert 'layer2.0.conv2 (DeformConv2dPack): seeded' in log.text()
    # torch's non-strict load says the same
    prefix = len('backbone.')
    state = {k[prefix:]: v for k, v in state.items() if k.startswith('backbone.')}
    with LogRecords() as log:
        model.load_state_dict(state, strict=False)
    assert [line for line in log.messages if LEFT in line] == lines


THREE_BRANCHES = B.names((B.KXK, B.ONE_BY_ONE_KXK, B.DW_PW))
TWO_BRANCHES = B.names((B.ONE_BY_ONE_AVG, B.ONE_BY_ONE_FREQ))


@pytest.mark.parametrize('orepa_cfg', [None, dict(scaling='scalar', branches=THREE_BRANCHES),
                                       dict(scaling='none', branches=TWO_BRANCHES)],
                         ids=['paper', 'scalar-3-branches', 'none-2-branches'])
def test_a_fused_backbone_loads_the_unfused_checkpoint(orepa_cfg, tmp_path):
    """Every layer type (the linear deep stem, Rep-1x1, the OREPA block), with other branches
    and scalings: deploy=True takes the un-fused entries and computes the un-fused network."""
    path = tmp_path / 'unfused.pth'
    imagenet = _imagenet_checkpoint(path, orepa_cfg=orepa_cfg).backbone
    cfg = dict(type='OREPAResNet', depth=50, out_indices=(3,), **SMALL, orepa_cfg=orepa_cfg,
               init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    fused = _scope('mmpretrain').build(dict(cfg, deploy=True))
    with LogRecords() as log:
        fused.init_weights()
    assert 'layer1.0.conv2 (Conv2d): seeded' in log.text()
    assert 'conv1 (Conv2d): seeded' in log.text() and LEFT not in log.text()
    x = torch.randn(2, 3, 32, 32)
    fused.eval()
    with torch.no_grad():
        assert rel_err(fused(x)[-1], imagenet(x)[-1]) <= 1e-4


def test_a_dbb_bias_goes_into_the_norm_after_the_conv(tmp_path):
    """DBB fuses to a conv with a bias; the deformable conv has none: BN2's running mean takes it.
    Reference: the DBB block on feature maps (each branch with its own norm), then BN2."""
    path = tmp_path / 'dbb.pth'
    imagenet = _imagenet_checkpoint(path, reparam='dbb').backbone
    model = _dcn_backbone(path, reparam='none')
    with LogRecords() as log:
        model.init_weights()
    assert LEFT not in log.text()
    x = torch.randn(2, SMALL['base_channels'] * 8, 9, 9, dtype=torch.float64)
    for name, conv in _deform_convs(model).items():
        block, _ = name.rsplit('.', 1)
        source = copy.deepcopy(imagenet.get_submodule(name)).double().eval()
        assert isinstance(source, DiverseBranchBlock)
        xs = x[:, :conv.in_channels]
        with torch.no_grad():
            expected = bn_eval(source(xs), imagenet.get_submodule(block).bn2)
            got = bn_eval(_as_conv(xs, conv), model.get_submodule(block).bn2)
        assert rel_err(got, expected) <= 1e-6, name


def test_no_layer_matches_entries_of_another_geometry():
    conv = torch.nn.Conv2d(8, 16, 3, bias=False)
    layer = OREPAConv2d(8, 16, 3)
    assert matching_layer(conv, layer.state_dict()) is not None
    assert matching_layer(torch.nn.Conv2d(8, 24, 3, bias=False), layer.state_dict()) is None
    assert matching_layer(conv, dict(layer.state_dict(), extra=torch.zeros(1))) is None
