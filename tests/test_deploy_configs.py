"""configs/deploy/: each takes the fused weights of its OREPA config, with no mmorepa inside."""
import re
from pathlib import Path

import pytest
from mmengine.config import Config

import mmorepa
from mmorepa.deploy import build_model, check_state_dict_fits, deploy_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = sorted((ROOT / 'configs' / 'deploy').glob('*.py'))


def _without_pretrained(cfg):
    cfg.model.backbone.pop('init_cfg', None)
    return cfg


@pytest.mark.parametrize('path', DEPLOY, ids=[p.stem for p in DEPLOY])
def test_deploy_config_takes_the_fused_weights(path):
    deploy_cfg = Config.fromfile(str(path))
    assert not deploy_cfg.custom_imports['imports']
    base = re.search(r"^_base_ = '(.+)'$", path.read_text(), re.M).group(1)
    train_path = (path.parent / base).resolve()
    train_cfg = _without_pretrained(Config.fromfile(str(train_path)))
    fused = mmorepa.reparameterize(build_model(train_cfg).eval())
    stock = build_model(deploy_cfg)
    assert not any(type(m).__module__.startswith('mmorepa') for m in stock.modules())
    check_state_dict_fits(stock, fused.state_dict(), path.name)
    stock.load_state_dict(fused.state_dict(), strict=True)
    # the generated deploy config (tools/deploy_convert.py) agrees with the static one
    generated = deploy_config(train_cfg).model.backbone
    assert generated['type'].split('.')[-1] == deploy_cfg.model.backbone.type
