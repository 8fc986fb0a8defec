"""The tools end to end: the main job (--quick), test --deploy, deploy_convert's refusals,
distributed training (2 processes, gloo), kill-then-resume equivalence, ONNX export of the demo
models, configs without ``default_scope``, and the demo config under mmpretrain's own train
script."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmorepa  # noqa: F401  (mmengine checkpoints load under weights_only=True)
from helpers import ROOT, randomize_network_, run_python, shapes_train_options
from mmorepa.config import build_model, read_config
from mmorepa.ops import branches as B

PY = sys.executable
CLS_CFG = 'configs/demo/orepa_r18_shapes_cls.py'
SHAPE = ['--input-shape', '1', '3', '32', '32']
MMPRETRAIN_TRAIN = Path(sys.prefix) / 'lib' / f'python{sys.version_info.major}.' \
    f'{sys.version_info.minor}' / 'site-packages' / 'mmpretrain' / '.mim' / 'tools' / 'train.py'


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """One quick run of the main job: all three toolboxes, train -> test -> fuse -> test."""
    base = tmp_path_factory.mktemp('demo')
    data, work = base / 'data', base / 'work'
    run_python(['tools/demo.py', '--quick', '--work-dir', work, '--data-root', data], check=True)
    return data, work


def test_demo_quick_fused_metrics_equal(demo):
    _, work = demo
    rows = json.loads((work / 'summary.json').read_text())
    assert [r['task'] for r in rows] == ['classification', 'detection', 'segmentation']
    for r in rows:
        assert r['before'] == pytest.approx(r['after'], abs=1e-9), r
        assert 0 < r['err'] <= 1e-5, r  # a real, independent comparison (float64 reference)
        deploy_cfg = (work / r['task'] / 'deploy' / 'fused.py').read_text()
        assert 'mmorepa' not in deploy_cfg and 'OREPA' not in deploy_cfg
    seg_cfg = (work / 'segmentation' / 'deploy' / 'fused.py').read_text()
    assert "type='ResNet'" in seg_cfg and 'contract_dilation=True' in seg_cfg


def test_test_deploy_flag_gives_the_same_metrics(demo, tmp_path):
    data, work = demo
    ckpt = (work / 'classification' / 'train' / 'last_checkpoint').read_text().strip()
    opts = ['--cfg-options', f'test_dataloader.dataset.data_root={data}/cls']
    plain = tmp_path / 'plain.json'
    fused = tmp_path / 'fused.json'
    run_python(['tools/test.py', CLS_CFG, ckpt, '--work-dir', tmp_path / 'a', '--out', plain] +
               opts, check=True, umask=0o022)
    run_python(['tools/test.py', CLS_CFG, ckpt, '--deploy', '--work-dir', tmp_path / 'b', '--out',
                fused] + opts, check=True, umask=0o022)
    assert json.loads(plain.read_text()) == json.loads(fused.read_text())
    # readable by a serving process of another user: the umask's 0644, not a temporary 0600
    assert plain.stat().st_mode & 0o777 == fused.stat().st_mode & 0o777 == 0o644


def test_deploy_convert_refusals(demo, tmp_path):
    _, work = demo
    ckpt = Path((work / 'classification' / 'train' / 'last_checkpoint').read_text().strip())
    before = ckpt.read_bytes()
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, ckpt, ckpt])
    assert proc.returncode and 'refusing to overwrite' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert ckpt.read_bytes() == before
    # a detector checkpoint for the classifier config: the first bad key is named (the backbone,
    # the same OREPA-ResNet-18 in both, fits key for key: the detector's neck does not)
    det_ckpt = (work / 'detection' / 'train' / 'last_checkpoint').read_text().strip()
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, det_ckpt, tmp_path / 'x.pth'])
    assert proc.returncode and "unexpected key 'neck.lateral_convs.0.conv.weight'" in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'x.pth').exists()
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, tmp_path / 'none.pth',
                       tmp_path / 'x.pth'])
    assert proc.returncode and 'checkpoint not found' in proc.stderr
    assert 'Traceback' not in proc.stderr
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(before[:len(before) // 2])
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, truncated, tmp_path / 'x.pth'])
    assert proc.returncode and f'cannot read checkpoint {truncated}' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'weights_only' not in proc.stderr.replace('weights_only=True', '')


def _tiny_cls_config(tmp_path, data):
    """The demo classifier, deterministic: no random augmentation, fixed sampler seed."""
    cfg = tmp_path / 'tiny_cls.py'
    cfg.write_text(f'''_base_ = '{ROOT / CLS_CFG}'
train_dataloader = dict(batch_size=8, dataset=dict(data_root='{data}/cls', indices=32,
    pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')]),
    sampler=dict(type='DefaultSampler', shuffle=True, seed=0))
val_dataloader = dict(dataset=dict(data_root='{data}/cls'))
test_dataloader = val_dataloader
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0, T_max=3)]
train_cfg = dict(max_epochs=3, val_interval=10)
default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1))
''')
    return cfg


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


def test_killed_and_resumed_run_ends_with_the_same_weights(demo, tmp_path):
    data, _ = demo
    cfg = _tiny_cls_config(tmp_path, data)
    run_python(['tools/train.py', cfg, '--work-dir', tmp_path / 'full'], check=True)
    # start the same run, kill it (SIGKILL) once the first checkpoint is complete
    wd = tmp_path / 'killed'
    proc = subprocess.Popen([PY, 'tools/train.py', str(cfg), '--work-dir', str(wd)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (wd / 'last_checkpoint').exists() and proc.poll() is None:
        assert time.time() < deadline, 'no checkpoint written'
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert not (wd / 'epoch_3.pth').exists()
    run_python(['tools/train.py', cfg, '--work-dir', wd, '--resume'], check=True)
    full, resumed = _weights(tmp_path / 'full' / 'epoch_3.pth'), _weights(wd / 'epoch_3.pth')
    assert set(full) == set(resumed)
    for k in full:
        assert torch.allclose(full[k].double(), resumed[k].double(), rtol=1e-5, atol=1e-7), k
    # and training did move the weights (the comparison is not vacuous)
    first = _weights(wd / 'epoch_1.pth')
    assert any(not torch.allclose(first[k].double(), full[k].double())
               for k in full if full[k].is_floating_point())


def test_distributed_training_two_processes(demo, tmp_path):
    data, _ = demo
    cfg = _tiny_cls_config(tmp_path, data)
    env = dict(os.environ, PORT=str(29400 + os.getpid() % 500), PYTHON=PY)
    proc = subprocess.run(['bash', 'tools/dist_train.sh', str(cfg), '2', '--work-dir',
                           str(tmp_path / 'ddp'), '--cfg-options', 'train_cfg.max_epochs=1'],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = next((tmp_path / 'ddp').glob('*/*.log')).read_text()
    assert 'Distributed training: True' in log
    # 32 images, 8 per process and step, 2 processes: 2 iterations per epoch
    assert 'Epoch(train) [1][2/2]' in log
    assert (tmp_path / 'ddp' / 'epoch_1.pth').exists()


@pytest.mark.parametrize('task,config', [
    ('classification', CLS_CFG),
    ('detection', 'configs/demo/faster_rcnn_orepa_r18_shapes.py')])
def test_export_onnx_matches_onnxruntime(demo, tmp_path, task, config):
    pytest.importorskip('onnxruntime')
    _, work = demo
    ckpt = (work / task / 'train' / 'last_checkpoint').read_text().strip()
    out = tmp_path / 'model.onnx'
    proc = run_python(['tools/export_onnx.py', config, ckpt, out, '--input-shape', '1', '3', '64',
                       '64'], check=True)
    assert 'onnxruntime at 1x3x64x64, 2x3x96x96' in proc.stdout  # dynamic batch and image size
    err = float(proc.stdout.split('relative error:')[1].split()[0])
    assert out.stat().st_size > 10000 and err <= 1e-5
    import onnx
    graph = onnx.load(str(out)).graph
    assert not any('OREPA' in n.name for n in graph.node)
    assert sum(n.op_type == 'Conv' for n in graph.node) >= 17  # plain convs only


NO_SCOPE = '''custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(
    type='{kind}',
    backbone=dict(type='OREPAResNet', depth=18, base_channels=8, stem_channels=8),
    neck=dict(type='mmpretrain.GlobalAveragePooling'),
    head=dict(type='mmpretrain.LinearClsHead', num_classes=3, in_channels=64,
              loss=dict(type='mmpretrain.CrossEntropyLoss')))
'''


def test_config_without_default_scope(tmp_path, tool_ok, tool_fails):
    """Fully qualified types instead of ``default_scope``; ``--cfg-options`` in export_onnx."""
    pytest.importorskip('onnxruntime')
    cfg = tmp_path / 'no_scope.py'
    cfg.write_text(NO_SCOPE.format(kind='mmpretrain.ImageClassifier'))
    model = build_model(read_config(cfg, {'model.head.num_classes': 4}))
    ckpt = tmp_path / 'four_classes.pth'
    torch.save(dict(state_dict=randomize_network_(model).state_dict()), ckpt)
    four = ['--cfg-options', 'model.head.num_classes=4']
    _, _, err = tool_ok('deploy_convert', cfg, ckpt, tmp_path / 'fused.pth', *SHAPE, *four)
    assert err <= 1e-5
    _, err = tool_ok('export_onnx', cfg, ckpt, tmp_path / 'm.onnx', *SHAPE, *four)
    assert err <= 1e-5
    # without the option the checkpoint does not fit: export_onnx did apply it above
    tool_fails('export_onnx', [cfg, ckpt, tmp_path / 'n.onnx'] + SHAPE, 'head.fc.weight')
    tool_fails('export_onnx', [cfg, ckpt, tmp_path / 'n.onnx', '--cfg-options',
                               'model.backbone.typo_arg=1'], 'typo_arg')
    # neither a default_scope nor a qualified type: the type is named
    cfg.write_text(NO_SCOPE.format(kind='ImageClassifier'))
    tool_fails('deploy_convert', [cfg, ckpt, tmp_path / 'x.pth'], 'ImageClassifier')
    assert not (tmp_path / 'x.pth').exists() and not (tmp_path / 'n.onnx').exists()


@pytest.mark.skipif(not MMPRETRAIN_TRAIN.is_file(), reason='mmpretrain ships no tools/train.py')
def test_demo_config_runs_under_mmpretrains_own_train_script(tmp_path, shapes_data):
    work = tmp_path / 'mmpretrain_train'
    proc = run_python([MMPRETRAIN_TRAIN, ROOT / CLS_CFG, '--work-dir', work, '--cfg-options'] +
                      shapes_train_options(shapes_data) + ['train_cfg.max_epochs=1'],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = next(work.glob('*/*.log')).read_text()
    assert 'Epoch(train) [1][2/2]' in log
    state = torch.load(work / 'epoch_1.pth', weights_only=True)['state_dict']
    kxk = '.' + B.KXK.leaves[0].attr
    assert any(k.endswith(kxk) for k in state)  # OREPA layers, through custom_imports
