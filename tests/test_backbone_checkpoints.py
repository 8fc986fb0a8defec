"""Checkpoints and deploy forms of the OREPA backbones: another re-parameterization's checkpoint
is named layer by layer, a non-stock ``stage_blocks`` model deploys, DBB in Res2Net fuses into the
stock Res2Net, a DDP checkpoint loads through ``init_cfg=Pretrained`` with a prefix."""

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import mmorepa
from mmorepa.config import build_model
from mmorepa.deploy import convert, deploy_config
from mmorepa.ops import branches as B

from helpers import LogRecords, eval_features, randomize_network_, rel_err, toolbox_registry

SMALL = dict(depth=50, stem_channels=32, base_channels=16, out_indices=(0, 1, 2, 3))


OTHER_BRANCHES = B.names((B.KXK, B.ONE_BY_ONE, B.ONE_BY_ONE_KXK))


@pytest.mark.parametrize('other', [dict(orepa_cfg=dict(branches=OTHER_BRANCHES)),
                                   dict(reparam='dbb')], ids=['other-branches', 'dbb'])
def test_checkpoint_of_another_reparameterization_is_named(other, tmp_path):
    """The checkpoint of other branches or of DBB: each OREPA layer whose entries it lacks is
    named with what it lacks (mmengine's generic key list names none of them), a non-strict
    load raises naming the layer; the model's own checkpoint loads without a word."""
    registry = toolbox_registry('mmpretrain')
    path = str(tmp_path / 'other.pth')
    torch.save(dict(state_dict=registry.build(dict(type='OREPAResNet', **SMALL, **other))
                    .state_dict()), path)
    model = registry.build(dict(type='OREPAResNet', **SMALL,
                                init_cfg=dict(type='Pretrained', checkpoint=path)))
    with LogRecords() as log:
        model.init_weights()
    assert ("layer1.0.conv2 (OREPAConv2d): the checkpoint's entries are those of another "
            're-parameterization') in log.text()
    assert f'{B.DW_PW.leaves[0].attr}, ' in log.text()  # among what the checkpoint lacks
    with pytest.raises(RuntimeError, match=r'layer1\.0\.conv2 \(OREPAConv2d\)'):
        model.load_state_dict(torch.load(path)['state_dict'], strict=False)
    # its own checkpoint: not a word
    torch.save(dict(state_dict=model.state_dict()), path)
    with LogRecords() as log:
        mmorepa_model = registry.build(dict(type='OREPAResNet', **SMALL, init_cfg=dict(
            type='Pretrained', checkpoint=path)))
        mmorepa_model.init_weights()
    assert 'another re-parameterization' not in log.text()


def test_non_stock_stage_blocks_deploy(tmp_path):
    """The config convert_official_checkpoint.py prints for the bottleneck fixture
    (stage_blocks (1, 2, 1, 1)) deploys as the same backbone with deploy=True."""
    from mmorepa.official import model_cfg
    torch.manual_seed(0)
    model = model_cfg(dict(bottleneck=True, stage_blocks=(1, 2, 1, 1), stem_channels=32,
                           base_channels=16, num_classes=10, feat_dim=512))
    cfg = Config(dict(default_scope='mmpretrain', custom_imports=dict(imports=['mmorepa']),
                      model=model))
    config, ckpt = tmp_path / 'official.py', tmp_path / 'official.pth'
    cfg.dump(str(config))
    torch.save(dict(state_dict=randomize_network_(build_model(cfg)).state_dict()), ckpt)
    out, deploy_cfg_path, err = convert(config, ckpt, tmp_path / 'fused.pth',
                                        input_shape=(1, 3, 32, 32))
    assert err <= 1e-5
    deployed = Config.fromfile(str(deploy_cfg_path))
    assert deployed.model.backbone.deploy is True
    assert list(deployed.model.backbone.stage_blocks) == [1, 2, 1, 1]
    assert 'reparam' not in deployed.model.backbone
    assert deployed.custom_imports['imports'] == ['mmorepa']
    stock = build_model(deployed)
    assert not any(isinstance(m, mmorepa.ReparamConv2d) for m in stock.modules())
    stock.load_state_dict(torch.load(out)['state_dict'], strict=True)
    assert deploy_config(deployed).model == deployed.model  # deploying it again: unchanged


@pytest.mark.parametrize('toolbox', ['mmpretrain', 'mmdet'])
def test_dbb_in_res2net_fuses_into_the_stock_res2net(toolbox):
    """Res2Net's 3x3 convs sit in ``convs``, their BNs in ``bns`` (a sibling list): DBB's bias
    goes into ``bns[i]`` and the fused model loads strictly into the stock Res2Net."""
    torch.manual_seed(1)
    registry = toolbox_registry(toolbox)
    cfg = dict(type='Res2Net', scales=4, base_width=26, **SMALL)
    model = randomize_network_(registry.build(dict(cfg, conv_cfg=dict(type='DBB'))))
    assert isinstance(model.layer1[0].convs[0], mmorepa.DiverseBranchBlock)
    x = torch.randn(1, 3, 32, 32)
    ref = eval_features(model, x)
    fused = mmorepa.reparameterize(model)
    stock = registry.build(cfg)
    stock.load_state_dict(fused.state_dict(), strict=True)
    assert rel_err(eval_features(stock, x), ref) <= 1e-5


def test_ddp_checkpoint_through_pretrained_prefix(tmp_path):
    """``module.backbone.*`` keys with ``prefix='backbone.'`` load (the ``module.`` of DDP is
    taken off); a prefix in neither form raises a ValueError naming it."""
    torch.manual_seed(2)
    registry = toolbox_registry('mmdet')
    stock = randomize_network_(registry.build(dict(type='ResNet', **SMALL)))
    path = str(tmp_path / 'ddp.pth')
    torch.save(dict(state_dict={f'module.backbone.{k}': v for k, v in
                                stock.state_dict().items()}), path)
    model = registry.build(dict(type='OREPAResNet', **SMALL, init_cfg=dict(
        type='Pretrained', checkpoint=path, prefix='backbone.')))
    model.init_weights()
    assert not hasattr(model, '_params_init_info')
    x = torch.randn(1, 3, 32, 32)
    assert rel_err(eval_features(model, x), eval_features(stock, x)) <= 1e-5
    # a prefix that is in neither form: one line naming it
    model = registry.build(dict(type='OREPAResNet', **SMALL, init_cfg=dict(
        type='Pretrained', checkpoint=path, prefix='neck.')))
    with pytest.raises(ValueError, match=r'no entries under the prefix.*neck\.'):
        model.init_weights()


def teardown_module():
    DefaultScope._instance_dict.clear()
