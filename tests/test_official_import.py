"""Checkpoints of the paper's official code: imported logits equal the official ones."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.registry import init_default_scope

import mmorepa
from mmorepa.checkpoint import load_checkpoint_strict
from mmorepa.errors import CheckpointError
from mmorepa.official import convert_state_dict

from helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / 'shared' / 'fixtures' / 'official_orepa'
NAMES = ['orepa_resnet_basic_w025_seed0', 'orepa_resnet_bottleneck_w025_seed0']
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason='shared fixtures not present')


def _build(cfg):
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS.build(cfg)


@pytest.mark.parametrize('name', NAMES)
def test_imported_model_gives_official_logits(name, tmp_path):
    sys.path.insert(0, str(ROOT / 'tools'))
    from convert_official_checkpoint import convert
    src = FIXTURES / f'{name}.pth'
    dst, cfg = convert(src, tmp_path / 'converted.pth')
    io = torch.load(FIXTURES / f'{name}_io.pth', weights_only=True)
    model = _build(cfg)
    load_checkpoint_strict(model, dst)
    model.eval()
    with torch.no_grad():
        logits = model(io['input'], mode='tensor')
        fused = mmorepa.reparameterize(model)
        fused_logits = fused(io['input'], mode='tensor')
    assert rel_err(logits, io['logits']) <= 1e-5
    assert rel_err(fused_logits, io['logits']) <= 1e-5
    # the deep stem import depends on the flip: without it the logits are far off
    sd = torch.load(src, weights_only=True)['state_dict']
    converted, _ = convert_state_dict(sd)
    for g in (1, 2):
        key = f'backbone.conv1.generators.{g}.weight_kxk'
        converted[key] = converted[key].flip(-1, -2)
    model.load_state_dict(converted)
    with torch.no_grad():
        assert rel_err(model(io['input'], mode='tensor'), io['logits']) > 1e-3


def test_mismatched_checkpoints_name_the_key(tmp_path):
    sd = torch.load(FIXTURES / f'{NAMES[0]}.pth', weights_only=True)['state_dict']
    extra = dict(sd, **{'stage9.0.conv1.weight': torch.zeros(1)})
    with pytest.raises(CheckpointError, match="stage9.0.conv1.weight"):
        convert_state_dict(extra)
    missing = {k: v for k, v in sd.items() if k != 'stage2.1.conv2.vector'}
    with pytest.raises(CheckpointError, match='stage2.1.conv2.vector'):
        convert_state_dict(missing)
    with pytest.raises(CheckpointError, match='not a checkpoint of the official'):
        convert_state_dict({'conv.weight': torch.zeros(1)})
    # a converted basic-block checkpoint does not fit a bottleneck model
    converted, _ = convert_state_dict(sd)
    path = tmp_path / 'c.pth'
    torch.save(dict(state_dict=converted), path)
    bottleneck = _build(dict(type='ImageClassifier', backbone=dict(
        type='OREPAResNet', depth=50, stage_blocks=(2, 2, 2, 2), base_channels=16,
        stem_channels=16),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=512)))
    with pytest.raises(CheckpointError, match=r"backbone\.layer1\.0\.conv1"):
        load_checkpoint_strict(bottleneck, path)


def test_cli_errors(tmp_path):
    tool = ROOT / 'tools' / 'convert_official_checkpoint.py'
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    for args, msg in (([str(tmp_path / 'nope.pth'), str(tmp_path / 'o.pth')], 'not found'),
                      ([str(corrupt), str(tmp_path / 'o.pth')], 'cannot read checkpoint'),
                      ([str(corrupt), str(corrupt)], 'refusing to overwrite')):
        proc = subprocess.run([sys.executable, str(tool)] + args, capture_output=True, text=True)
        assert proc.returncode != 0 and msg in proc.stderr, proc.stderr
    assert corrupt.read_bytes() == b'not a checkpoint'
