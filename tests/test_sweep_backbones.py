"""The sweep over every ``OREPA<Name>`` of the installed toolboxes (tools/analysis/
sweep_backbones.py), at small widths: each builds, trains a step, fuses, loads strictly into the
stock class its deploy config builds, and computes the un-fused features; the k x k convs kept
plain are those that do not compute as a plain zero-padded conv."""
import sys
from pathlib import Path

import pytest
from mmengine.registry import DefaultScope

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))

import sweep_backbones  # noqa: E402
from mmorepa.models.backbones.any_backbone import toolbox_backbone_names  # noqa: E402

NAMES = [(t, n) for t in sweep_backbones.TOOLBOXES for n in toolbox_backbone_names(t)
         if n != 'VGG']
# why a k x k conv may stay plain: a conv op of its own, an even or non-square kernel
CONV_OPS = ('DeformConv2d', 'ModulatedDeformConv2d', 'SAConv2d', 'ConvAWS2d', 'ConvWS2d',
            'Conv1d', 'Conv3d', 'ConvTranspose2d', 'TridentConv', 'kernel_size 1, 3 or odd',
            'an int or a square pair')


@pytest.mark.parametrize('toolbox,name', NAMES, ids=[f'{t}-{n}' for t, n in NAMES])
def test_every_orepa_name(toolbox, name):
    row = sweep_backbones.check_backbone(toolbox, name)
    if row.get('skip'):
        assert name in sweep_backbones.NEEDS or 'without registering it' in row['skip']
        pytest.skip(row['skip'])
    assert row['error'] is None, row['error']
    assert row['rel_err'] <= sweep_backbones.TOLERANCE
    for entry in row['kept']:
        assert any(op in entry for op in CONV_OPS), entry


def test_weights_left_uninitialized_by_the_stock_class_are_drawn(monkeypatch):
    """mmdet's TridentConv leaves its weight as uninitialized memory: the row does not depend
    on what that memory held."""
    from mmdet.models.backbones.trident_resnet import TridentConv
    stock_init = TridentConv.__init__

    def init_with_nan(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        self.weight.data.fill_(float('nan'))
    monkeypatch.setattr(TridentConv, '__init__', init_with_nan)
    row = sweep_backbones.check_backbone('mmdet', 'TridentResNet')
    assert row['error'] is None and row['rel_err'] <= sweep_backbones.TOLERANCE


def test_the_table_has_one_row_per_name():
    rows = [dict(toolbox='mmdet', name='X', layers=3, kept=['a (why)', 'b (why)'],
                 rel_err=1e-7, error=None)]
    text = sweep_backbones.table(rows)
    assert text.splitlines()[-1] == '| mmdet | OREPAX | 3 | 2 x why | 1.0e-07 | ok |'
    # a reference not computed in float64 is named
    rows[0]['reference'] = 'float32'
    assert sweep_backbones.table_row(rows[0]) == \
        '| mmdet | OREPAX | 3 | 2 x why | 1.0e-07 (float32 reference) | ok |'
    skipped = dict(rows[0], kept=[], rel_err=None, skip='not built here: needs timm')
    assert sweep_backbones.table_row(skipped).endswith('| none |  | not built here: needs timm |')


def teardown_module():
    DefaultScope._instance_dict.clear()
