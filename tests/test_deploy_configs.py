"""configs/deploy/: each equals, field by field, what ``deploy_config`` generates from its training
config, holds no mmorepa, and takes the fused weights of that training config. A generated deploy
config that still builds an mmorepa name keeps the mmorepa import."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config

import mmorepa
from mmorepa.checkpoint import check_state_dict_fits
from mmorepa.config import build_model
from mmorepa.deploy import deploy_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = sorted((ROOT / 'configs' / 'deploy').glob('*.py'))


def _plain(node):
    """Config values as plain Python (ConfigDict -> dict, tuple -> list) for comparison."""
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


@pytest.mark.parametrize('path', DEPLOY, ids=[p.stem for p in DEPLOY])
def test_deploy_config_is_the_generated_one_and_takes_the_fused_weights(path):
    deploy_cfg = Config.fromfile(str(path))
    assert not deploy_cfg.custom_imports['imports']
    base = re.search(r"^_base_ = '(.+)'$", path.read_text(), re.M).group(1)
    train_cfg = Config.fromfile(str((path.parent / base).resolve()))
    generated = deploy_config(train_cfg)
    # field by field: the whole model, the imports, the pretrained weights
    assert _plain(generated.model.to_dict()) == _plain(deploy_cfg.model.to_dict())
    assert 'custom_imports' not in generated and generated.load_from is None
    train_cfg.model.backbone.pop('init_cfg', None)
    fused = mmorepa.reparameterize(build_model(train_cfg).eval())
    stock = build_model(deploy_cfg)
    assert not any(type(m).__module__.startswith('mmorepa') for m in stock.modules())
    check_state_dict_fits(stock, fused.state_dict(), path.name)
    stock.load_state_dict(fused.state_dict(), strict=True)


def test_a_deploy_config_that_still_builds_an_orepa_name_keeps_the_import():
    """A backbone with ``stage_blocks`` that its class does not take stays ``OREPA<Name>`` with
    ``deploy=True``; where that name is only in the toolbox's registry (a class the user
    registered there), the deploy config still imports mmorepa: with the default scope and
    under a scoped model type."""
    from mmengine.registry import DefaultScope, init_default_scope
    from mmpretrain.models.backbones import ResNet
    from mmpretrain.registry import MODELS
    name = 'UserResNetForDeployImports'
    MODELS.register_module(module=type(name, (ResNet, ), {}))
    backbone = dict(type=f'OREPA{name}', depth=18, base_channels=8, stem_channels=8,
                    stage_blocks=(1, 1, 1, 1))
    try:
        scoped = Config(dict(default_scope='mmpretrain', custom_imports=dict(
            imports=['mmorepa']), model=dict(type='ImageClassifier', backbone=backbone)))
        DefaultScope._instance_dict.clear()
        bare = Config(dict(custom_imports=dict(imports=['mmorepa']),
                           model=dict(type='mmpretrain.ImageClassifier', backbone=backbone)))
        for cfg in (scoped, bare):
            deployed = deploy_config(cfg)
            assert deployed.model.backbone.type == f'OREPA{name}'
            assert deployed.model.backbone.deploy is True
            assert deployed.custom_imports == dict(imports=['mmorepa'])
            DefaultScope._instance_dict.clear()
        init_default_scope('mmpretrain')
        stock = build_model(deploy_config(scoped))
        fused = mmorepa.reparameterize(build_model(scoped).eval())
        stock.load_state_dict(fused.state_dict(), strict=True)
    finally:
        MODELS.module_dict.pop(name, None)
        MODELS.module_dict.pop(f'OREPA{name}', None)
        DefaultScope._instance_dict.clear()
