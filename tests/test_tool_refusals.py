"""Issue 14, the tools: no user file deleted or overwritten, every failure one line (exit status 1,
no traceback) naming the bad value or path, found before any work; fused checkpoints with the
training config, configs without ``default_scope``, per-class metrics in ``test.py --out``.

Most tools run in this process (``run_tool(main, argv)``, what ``python tools/X.py`` runs): an
unexpected exception escapes ``run_tool`` and fails the test, as a traceback would."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mmorepa
from mmorepa.datasets import make_shapes_dataset
from mmorepa.deploy import (DEPLOY_CONFIG_HEADER, CheckpointError, atomic_write, build_model,
                            load_checkpoint_strict)
from mmorepa.runtime import ToolError, read_config, run_tool

from helpers import randomize_network_, rel_err

ROOT = Path(__file__).resolve().parents[1]
CLS_CFG = ROOT / 'configs/demo/orepa_r18_shapes_cls.py'
LONG = 'n' * 300  # longer than NAME_MAX (255) on every Linux file system
SHAPE = ['--input-shape', '1', '3', '32', '32']


def _tool(name):
    spec = importlib.util.spec_from_file_location(f'mmorepa_tools_{name}',
                                                  ROOT / 'tools' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ok(name, *argv):
    return run_tool(_tool(name).main, [str(a) for a in argv])


def _fails(capsys, name, argv, *names):
    """The tool exits with status 1 and one error line on stderr naming each of ``names``."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_tool(_tool(name).main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    errors = [line for line in err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    for n in names:
        assert str(n) in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope='module')
def tiny_cfg(tmp_path_factory):
    """The demo classifier with a quarter of its block width (the stem keeps its 32 channels: a
    plain 7x7 stem factors exactly into its 3x3 generators), tested on a few generated images
    with per-class metrics (a list per metric)."""
    base = tmp_path_factory.mktemp('tiny')
    data = make_shapes_dataset(base / 'shapes', num_train=3, num_val=6, size=32)
    cfg = base / 'tiny_cls.py'
    cfg.write_text(f'''_base_ = '{CLS_CFG}'
model = dict(backbone=dict(base_channels=8), head=dict(in_channels=64))
test_dataloader = dict(dataset=dict(data_root='{data}/cls'))
test_evaluator = [dict(type='Accuracy'), dict(type='SingleLabelMetric', average=None)]
''')
    return cfg


@pytest.fixture(scope='module')
def cls_model(tiny_cfg):
    model = build_model(read_config(tiny_cfg))
    return randomize_network_(model, torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope='module')
def cls_ckpt(cls_model, tiny_cfg):
    path = tiny_cfg.parent / 'cls.pth'
    torch.save(dict(state_dict=cls_model.state_dict()), path)
    return path


@pytest.fixture(scope='module')
def fused(cls_ckpt, tiny_cfg):
    """deploy_convert's fused checkpoint of ``cls_ckpt`` and its deploy config (beside it)."""
    out = cls_ckpt.parent / 'fused' / 'fused.pth'
    _ok('deploy_convert', tiny_cfg, cls_ckpt, out, *SHAPE)
    return out


@pytest.fixture
def corrupt(tmp_path):
    path = tmp_path / 'corrupt.pth'
    path.write_bytes(b'no checkpoint')
    return path


# item 3: the demo's data root --------------------------------------------------------------------
def test_demo_refuses_a_data_root_it_did_not_generate(tmp_path, capsys):
    data = tmp_path / 'data'
    (data / 'coco').mkdir(parents=True)
    (data / 'coco' / 'instances.json').write_text('{}')
    _fails(capsys, 'demo', ['--quick', '--data-root', data, '--work-dir', tmp_path / 'w'], data)
    assert (data / 'coco' / 'instances.json').read_text() == '{}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']  # nothing else was started


def test_shapes_dataset_replaces_only_its_own_data(tmp_path):
    root = tmp_path / 'shapes'
    root.mkdir()  # an empty folder may be used
    make_shapes_dataset(root, num_train=3, num_val=3, size=16)
    assert sorted(p.name for p in root.iterdir()) == ['.complete', 'cls', 'det', 'seg']
    make_shapes_dataset(root, num_train=4, num_val=3, size=16)  # ours, other parameters: redone
    assert len(list((root / 'det' / 'train').iterdir())) == 4
    (root / 'notes.txt').write_text('mine')
    with pytest.raises(ToolError, match='notes.txt'):
        make_shapes_dataset(root, num_train=5, num_val=3, size=16)
    assert (root / 'notes.txt').read_text() == 'mine'
    make_shapes_dataset(root, num_train=4, num_val=3, size=16)  # the same set: reused as it is
    assert (root / 'notes.txt').exists()


# item 4: the deploy config beside the fused checkpoint -------------------------------------------
def test_deploy_convert_never_replaces_a_config_it_did_not_write(tmp_path, tiny_cfg, cls_ckpt,
                                                                 capsys):
    out = tmp_path / 'model.pth'
    (tmp_path / 'model.py').write_text('# my model\n')
    _fails(capsys, 'deploy_convert', [tiny_cfg, cls_ckpt, out] + SHAPE, tmp_path / 'model.py')
    assert not out.exists() and (tmp_path / 'model.py').read_text() == '# my model\n'
    # named with --out-config, it goes there
    _ok('deploy_convert', tiny_cfg, cls_ckpt, out, '--out-config', tmp_path / 'deploy.py', *SHAPE)
    assert (tmp_path / 'model.py').read_text() == '# my model\n'
    written = (tmp_path / 'deploy.py').read_text()
    assert written.startswith(DEPLOY_CONFIG_HEADER) and "type='ResNet'" in written
    assert 'mmorepa' not in written  # a deploy config needs no mmorepa
    assert out.is_file()


def test_deploy_convert_replaces_its_own_deploy_config(fused, tiny_cfg, tmp_path):
    """A second run to the same output (the demo run again) replaces the deploy config it wrote:
    the fused checkpoint converted again with the training config (item 14)."""
    out = tmp_path / 'fused.pth'
    (tmp_path / 'fused.py').write_text(f'{DEPLOY_CONFIG_HEADER} from an earlier run\nx = 1\n')
    _, _, err = _ok('deploy_convert', tiny_cfg, fused, out, *SHAPE)
    assert err <= 1e-5
    assert "type='ResNet'" in (tmp_path / 'fused.py').read_text()


# item 6: model configs that do not build, in train.py and test.py -----------------------------
@pytest.mark.parametrize('option,bad', [('model.backbone.reparam=orepaa', 'orepaa'),
                                        ('model.backbone.typo_arg=1', 'typo_arg'),
                                        ('model.backbone.orepa_cfg.branches=kxk', 'kxk'),
                                        ('model.backbone.type=NoSuchNet', 'NoSuchNet')])
def test_train_bad_model_option_is_one_line(option, bad, tmp_path, capsys):
    _fails(capsys, 'train', [CLS_CFG, '--work-dir', tmp_path / 'w', '--cfg-options', option],
           bad)


def test_test_bad_model_option_is_one_line(tmp_path, cls_ckpt, capsys):
    _fails(capsys, 'test', [CLS_CFG, cls_ckpt, '--work-dir', tmp_path / 'w', '--cfg-options',
                            'model.backbone.typo_arg=1'], 'typo_arg')


# items 7 and 16: no default_scope (fully qualified types); export_onnx's --cfg-options -------
NO_SCOPE = '''custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(
    type='{kind}',
    backbone=dict(type='OREPAResNet', depth=18, base_channels=8, stem_channels=8),
    neck=dict(type='mmpretrain.GlobalAveragePooling'),
    head=dict(type='mmpretrain.LinearClsHead', num_classes=3, in_channels=64,
              loss=dict(type='mmpretrain.CrossEntropyLoss')))
'''


def test_config_without_default_scope(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    cfg = tmp_path / 'no_scope.py'
    cfg.write_text(NO_SCOPE.format(kind='mmpretrain.ImageClassifier'))
    model = build_model(read_config(cfg, {'model.head.num_classes': 4}))
    ckpt = tmp_path / 'four_classes.pth'
    torch.save(dict(state_dict=randomize_network_(model).state_dict()), ckpt)
    four = ['--cfg-options', 'model.head.num_classes=4']
    _, _, err = _ok('deploy_convert', cfg, ckpt, tmp_path / 'fused.pth', *SHAPE, *four)
    assert err <= 1e-5
    _, err = _ok('export_onnx', cfg, ckpt, tmp_path / 'm.onnx', *SHAPE, *four)
    assert err <= 1e-5
    # without the option the checkpoint does not fit: export_onnx did apply it above
    _fails(capsys, 'export_onnx', [cfg, ckpt, tmp_path / 'n.onnx'] + SHAPE, 'head.fc.weight')
    _fails(capsys, 'export_onnx', [cfg, ckpt, tmp_path / 'n.onnx', '--cfg-options',
                                   'model.backbone.typo_arg=1'], 'typo_arg')
    # neither a default_scope nor a qualified type: the type is named
    cfg.write_text(NO_SCOPE.format(kind='ImageClassifier'))
    _fails(capsys, 'deploy_convert', [cfg, ckpt, tmp_path / 'x.pth'], 'ImageClassifier')
    assert not (tmp_path / 'x.pth').exists() and not (tmp_path / 'n.onnx').exists()


# item 8: per-class metrics in test.py --out; item 14: a fused checkpoint with the training config
def test_as_json_converts_per_class_metrics():
    as_json = _tool('test').as_json
    metrics = {'a': torch.tensor(0.5), 'b': torch.tensor([1.0, 2.0]), 'c': np.float32(3.0),
               'd': [torch.tensor(1.0), np.array([2.0, 3.0])], 'e': 4}
    assert json.loads(json.dumps({k: as_json(v) for k, v in metrics.items()})) == {
        'a': 0.5, 'b': [1.0, 2.0], 'c': 3.0, 'd': [1.0, [2.0, 3.0]], 'e': 4.0}


def test_fused_checkpoint_loads_into_the_training_model_exactly(cls_model, fused, tiny_cfg):
    model = build_model(read_config(tiny_cfg)).eval()
    load_checkpoint_strict(model, fused)  # the OREPA layers seed from the plain weights
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mmorepa.unfused_eval(model), mmorepa.unfused_eval(cls_model):
        assert rel_err(model(x, mode='tensor'), cls_model(x, mode='tensor')) <= 1e-5
    # a fused checkpoint that does not fit names the key and the deploy config to use
    state = torch.load(fused, weights_only=True)
    state['state_dict']['backbone.extra'] = torch.ones(1)
    bad = fused.with_name('extra.pth')
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match="'backbone.extra'.*use the deploy config"):
        load_checkpoint_strict(build_model(read_config(tiny_cfg)), bad)


def test_fused_checkpoint_that_seeds_inexactly_is_refused(tiny_cfg, tmp_path):
    """An 8-channel stem cannot take every plain 7x7 kernel (its 3x3 generators factor one
    exactly only from 27 channels on): loading would change what the model computes."""
    cfg = read_config(tiny_cfg, {'model.backbone.stem_channels': 8})
    model = randomize_network_(build_model(cfg), torch.Generator().manual_seed(2)).eval()
    path = tmp_path / 'fused.pth'
    torch.save(dict(state_dict=mmorepa.reparameterize(model).state_dict(),
                    meta=dict(mmorepa_fused_from='x.pth')), path)
    with pytest.raises(CheckpointError, match=r'backbone\.conv1 .*exactly.*use the deploy config'):
        load_checkpoint_strict(build_model(cfg), path)


def test_test_tool_fused_checkpoint_and_per_class_metrics(fused, tiny_cfg, tmp_path):
    out = tmp_path / 'metrics.json'
    proc = subprocess.run([sys.executable, 'tools/test.py', str(tiny_cfg), str(fused), '--work-dir',
                           str(tmp_path / 'w'), '--out', str(out)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert len(metrics['single-label/precision_classwise']) == 3
    assert 0 <= metrics['accuracy/top1'] <= 100


# item 9: names too long, refused before any work; a legal long name is written -----------------
@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
def test_too_long_output_name_is_refused_first(tool, tmp_path, corrupt, capsys):
    out = tmp_path / f'{LONG}.out'
    _fails(capsys, tool, [CLS_CFG, corrupt, out], 'name too long', LONG)


def test_too_long_names_in_test_and_train(tmp_path, corrupt, capsys):
    _fails(capsys, 'test', [CLS_CFG, corrupt, '--out', tmp_path / f'{LONG}.json', '--work-dir',
                            tmp_path / 'w'], 'name too long', LONG)
    _fails(capsys, 'train', [CLS_CFG, '--work-dir', tmp_path / LONG / 'w'], 'name too long', LONG)
    assert list(tmp_path.iterdir()) == [corrupt]


def test_atomic_write_takes_any_legal_name(tmp_path):
    path = tmp_path / ('m' * 250 + '.json')  # legal: 255 bytes
    atomic_write(path, lambda p: Path(p).write_text('{}'))
    assert path.read_text() == '{}' and list(tmp_path.iterdir()) == [path]


# item 13: the distributed launchers without their arguments ------------------------------------
@pytest.mark.parametrize('script,args', [('dist_train.sh', [CLS_CFG]),
                                         ('dist_train.sh', [CLS_CFG, 'two']),
                                         ('dist_test.sh', [CLS_CFG, CLS_CFG])])
def test_dist_scripts_need_num_procs(script, args):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(['bash', f'tools/{script}'] + [str(a) for a in args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'NUM_PROCS' in lines[0] and 'usage:' in lines[0], proc.stderr
