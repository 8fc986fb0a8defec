"""The tools as a hostile user meets them: every expected failure is one line on stderr naming the
bad value or path, a non-zero exit and no traceback, found before any work; outputs get the
permissions of the umask; ONNX with dynamic axes; ``--amp`` on the CPU; kernels in float32 under
autocast; the demo config under mmpretrain's own train script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmorepa
from mmorepa.deploy import CheckpointError, atomic_write, build_model, read_state_dict
from mmorepa.layers import OREPAConv1x1, OREPAConv2d, OREPALargeConv
from mmorepa.runtime import CPUAutocastOptimWrapper, ToolError, read_config

from helpers import randomize_network_, rel_err

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLS_CFG = ROOT / 'configs/demo/orepa_r18_shapes_cls.py'
MMPRETRAIN_TRAIN = Path(sys.prefix) / 'lib' / f'python{sys.version_info.major}.' \
    f'{sys.version_info.minor}' / 'site-packages' / 'mmpretrain' / '.mim' / 'tools' / 'train.py'


def _run(args, umask=None, cwd=ROOT):
    return subprocess.run([PY] + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def _assert_clean_failure(proc, *names):
    """Exit 1, no traceback, and the last stderr line (the error) names every one of ``names``."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert 'error:' in line, proc.stderr[-3000:]
    for name in names:
        assert str(name) in line, (name, line)
    return line


@pytest.fixture(scope='module')
def cls_ckpt(tmp_path_factory):
    """A checkpoint of the demo classifier (random weights, random BN statistics)."""
    path = tmp_path_factory.mktemp('ckpt') / 'cls.pth'
    model = build_model(read_config(CLS_CFG))
    randomize_network_(model, torch.Generator().manual_seed(0))
    torch.save(dict(state_dict=model.state_dict()), path)
    return path


@pytest.fixture
def corrupt(tmp_path):
    path = tmp_path / 'random.pth'
    path.write_bytes(bytes(range(256)) * 8)
    return path


def _read_only_dir(tmp_path):
    """A folder in which no file can be created: mode 0555, or /sys where we run as root."""
    ro = tmp_path / 'read_only'
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / 'probe').touch()
    except OSError:
        return ro
    (ro / 'probe').unlink()
    ro.chmod(0o755)
    try:
        (Path('/sys') / 'mmorepa_probe').touch()
    except OSError:
        return Path('/sys')
    pytest.skip('no place here in which file creation is refused')


def _unwritable(kind, tmp_path):
    if kind == 'read-only folder':
        return _read_only_dir(tmp_path) / 'out.pth'
    if kind == 'parent is a file':
        (tmp_path / 'a_file').write_text('x')
        return tmp_path / 'a_file' / 'out.pth'
    (tmp_path / 'a_dir.pth').mkdir()
    return tmp_path / 'a_dir.pth'


# 1. Outputs that cannot be written: refused before any work, the output named -----------------
@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
@pytest.mark.parametrize('kind', ['read-only folder', 'parent is a file', 'output is a folder'])
def test_unwritable_output_is_refused_before_any_work(tool, kind, tmp_path, corrupt):
    out = _unwritable(kind, tmp_path)
    # the checkpoint is corrupt: had the tool read it first, the message would be about it
    proc = _run([f'tools/{tool}.py', CLS_CFG, corrupt, out])
    line = _assert_clean_failure(proc, out)
    assert 'random.pth' not in line and '.tmp' not in line and f'.{out.name}.' not in line
    assert list(tmp_path.rglob('.*')) == []  # no temporary or probe file left behind


def test_atomic_write_names_the_output_not_the_temporary_file(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(ToolError, match=f'cannot write {tmp_path / "a_file" / "x.json"}'):
        atomic_write(tmp_path / 'a_file' / 'x.json', lambda p: Path(p).write_text('{}'))

    def failing_write(p):
        raise OSError(28, 'No space left on device', p)  # what a full disk gives, on the tmp file
    with pytest.raises(ToolError) as e:
        atomic_write(tmp_path / 'out.json', failing_write)
    assert str(tmp_path / 'out.json') in str(e.value) and 'No space left' in str(e.value)
    assert '.out.json.' not in str(e.value)
    assert list(tmp_path.iterdir()) == [tmp_path / 'a_file']  # no temporary file left


# 2. Permissions: what the umask gives any new file, not mkstemp's 0600 --------------------------
@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_atomic_write_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / 'x.json', lambda p: Path(p).write_text('{}'))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_deploy_convert_outputs_are_readable_by_others_under_umask_022(tmp_path, cls_ckpt):
    out = tmp_path / 'deploy' / 'fused.pth'
    proc = _run(['tools/deploy_convert.py', CLS_CFG, cls_ckpt, out, '--input-shape', '1', '3',
                 '32', '32'], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.with_suffix('.py').stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ['fused.pth', 'fused.py']


# 3. Input shapes the model cannot take --------------------------------------------------------
@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
@pytest.mark.parametrize('shape', [('0', '3', '64', '64'), ('2', '5', '64', '64')])
def test_bad_input_shape_is_one_line(tool, shape, tmp_path, cls_ckpt):
    out = tmp_path / 'out.pth'
    proc = _run([f'tools/{tool}.py', CLS_CFG, cls_ckpt, out, '--input-shape', *shape])
    _assert_clean_failure(proc, '--input-shape', ' '.join(shape))
    assert not out.exists()


# 4. Checkpoints that are no checkpoints, or do not fit --------------------------------------------
def test_random_file_is_not_a_checkpoint_and_no_unsafe_advice(tmp_path, corrupt):
    proc = _run(['tools/deploy_convert.py', CLS_CFG, corrupt, tmp_path / 'x.pth'])
    line = _assert_clean_failure(proc, corrupt, 'not a PyTorch checkpoint')
    assert 'weights_only=False' not in proc.stderr and 'weights_only` set to `False' not in line


def test_unreadable_checkpoint_reasons(tmp_path):
    import argparse
    torch.save(argparse.Namespace(lr=0.1), tmp_path / 'pickled_object.pth')
    with pytest.raises(CheckpointError, match='argparse.Namespace') as e:
        read_state_dict(tmp_path / 'pickled_object.pth')
    assert 'False' not in str(e.value)
    torch.save(dict(state_dict=dict(w=torch.ones(300))), tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated.pth: corrupt or truncated'):
        read_state_dict(tmp_path / 'truncated.pth')
    assert read_state_dict(tmp_path / 'good.pth')['w'].sum() == 300


def test_mismatched_checkpoint_names_the_key(tmp_path, cls_ckpt):
    state = torch.load(cls_ckpt, weights_only=True)['state_dict']
    key = next(k for k in state if k.endswith('scales') or 'weight' in k)
    state.pop(key)
    torch.save(dict(state_dict=state), tmp_path / 'partial.pth')
    proc = _run(['tools/export_onnx.py', CLS_CFG, tmp_path / 'partial.pth', tmp_path / 'x.onnx',
                 '--input-shape', '1', '3', '32', '32'])
    _assert_clean_failure(proc, f'missing key {key!r}', 'partial.pth')
    assert not (tmp_path / 'x.onnx').exists()


# 5. The other tools: missing inputs, broken configs, unwritable outputs ---------------------------
def test_test_tool_refuses_a_folder_as_out_before_testing(tmp_path, cls_ckpt):
    (tmp_path / 'metrics').mkdir()
    proc = _run(['tools/test.py', CLS_CFG, cls_ckpt, '--out', tmp_path / 'metrics',
                 '--work-dir', tmp_path / 'work'])
    _assert_clean_failure(proc, tmp_path / 'metrics', 'is a directory')
    assert not (tmp_path / 'work').exists()


def test_test_tool_missing_checkpoint(tmp_path):
    proc = _run(['tools/test.py', CLS_CFG, tmp_path / 'none.pth'])
    _assert_clean_failure(proc, 'checkpoint not found', tmp_path / 'none.pth')


def test_train_broken_config_and_missing_resume(tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text("model = dict(type='ImageClassifier'\n")
    _assert_clean_failure(_run(['tools/train.py', broken]), 'cannot read config', broken)
    _assert_clean_failure(_run(['tools/train.py', tmp_path / 'none.py']), 'config not found',
                          tmp_path / 'none.py')
    proc = _run(['tools/train.py', CLS_CFG, '--resume', tmp_path / 'gone.pth', '--work-dir',
                 tmp_path / 'w'])
    _assert_clean_failure(proc, tmp_path / 'gone.pth')


def test_train_work_dir_under_a_file(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    proc = _run(['tools/train.py', CLS_CFG, '--work-dir', tmp_path / 'a_file' / 'work'])
    _assert_clean_failure(proc, tmp_path / 'a_file' / 'work', 'not a directory')


def test_convert_official_checkpoint_output_is_a_folder(tmp_path, corrupt):
    proc = _run(['tools/convert_official_checkpoint.py', corrupt, tmp_path])
    _assert_clean_failure(proc, tmp_path, 'is a directory')


# 6. ONNX: dynamic batch and image size, checked with onnxruntime at two shapes ------------------
def test_onnx_dynamic_axes_at_two_shapes(tmp_path, cls_ckpt):
    ort = pytest.importorskip('onnxruntime')
    out = tmp_path / 'cls.onnx'
    proc = _run(['tools/export_onnx.py', CLS_CFG, cls_ckpt, out, '--input-shape', '1', '3', '64',
                 '64'], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'onnxruntime at 1x3x64x64, 2x3x96x96' in proc.stdout
    assert out.stat().st_mode & 0o777 == 0o644
    # an independent reference: the un-fused model of the config, loaded from the checkpoint
    model = build_model(read_config(CLS_CFG))
    model.load_state_dict(torch.load(cls_ckpt, weights_only=True)['state_dict'])
    model.eval()
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    g = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 48, 48), (2, 3, 80, 112)]:  # neither is the export shape
        x = torch.randn(*shape, generator=g)
        with torch.no_grad(), mmorepa.unfused_eval(model):
            ref = model(x, mode='tensor')
        got = torch.from_numpy(session.run(None, {'input': x.numpy()})[0])
        assert got.shape == ref.shape == (shape[0], 3)
        assert rel_err(got, ref) <= 1e-5


def test_onnx_static_shape_refuses_another_batch(tmp_path, cls_ckpt):
    ort = pytest.importorskip('onnxruntime')
    out = tmp_path / 'static.onnx'
    proc = _run(['tools/export_onnx.py', CLS_CFG, cls_ckpt, out, '--static-shape',
                 '--input-shape', '1', '3', '32', '32'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    with pytest.raises(Exception, match='(?i)dimension|shape'):
        session.run(None, {'input': torch.zeros(2, 3, 32, 32).numpy()})


# 7. Mixed precision on the CPU ---------------------------------------------------------------
def _kernel_seen_by_conv(layer, x):
    seen = {}
    conv = layer._conv

    def spy(x, kernel, bias):
        out = conv(x, kernel, bias)
        seen.update(kernel=kernel.detach().clone(), out_dtype=out.dtype)
        return out
    layer._conv = spy
    with torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x)
    del layer._conv
    return seen['kernel'], seen['out_dtype']


@pytest.mark.parametrize('make', [
    lambda: OREPAConv2d(8, 16, 3, norm_cfg=dict(type='BN')),
    lambda: OREPAConv1x1(8, 16, norm_cfg=dict(type='BN')),
    lambda: OREPALargeConv(8, 16, 5, norm_cfg=dict(type='BN')),
    lambda: OREPAConv2d(8, 16, 3, stride=2, groups=2, bias=True, scaling='scalar')])
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_kernel_is_squeezed_in_float32_under_autocast(make, mode):
    torch.manual_seed(0)
    layer = randomize_network_(make(), torch.Generator().manual_seed(0)).train(mode == 'train')
    x = torch.randn(2, 8, 12, 12)
    kernel, out_dtype = _kernel_seen_by_conv(layer, x)
    with torch.no_grad():  # the same algebra without autocast (float32 throughout)
        ref = layer.squeezed_kernel_and_bias()[0] if mode == 'train' else layer.fused_kernel_and_bias()[0]
    assert kernel.dtype == torch.float32
    assert rel_err(kernel, ref) <= 1e-6  # squeezing in bfloat16 gives about 1e-3
    assert out_dtype == torch.bfloat16  # the final conv does run in low precision


def test_cpu_autocast_optim_wrapper_context():
    model = torch.nn.Linear(4, 4)
    wrapper = CPUAutocastOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        assert torch.is_autocast_enabled('cpu')
        assert torch.get_autocast_dtype('cpu') == torch.bfloat16
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled('cpu')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    from mmorepa.datasets import make_shapes_dataset
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(root, num_train=16, num_val=8)
    return root


def _data_opts(shapes):
    return [f'{split}_dataloader.dataset.data_root={shapes}/cls'
            for split in ('train', 'val', 'test')] + [
        'train_dataloader.batch_size=8', 'train_dataloader.dataset.indices=16',
        'train_cfg.max_epochs=2', 'train_cfg.val_interval=10', 'default_hooks.logger.interval=1',
        'default_hooks.checkpoint.interval=1']


@pytest.mark.skipif(torch.cuda.is_available(), reason='the CPU path of --amp')
def test_amp_on_the_cpu_trains_in_bfloat16(tmp_path, shapes):
    work = tmp_path / 'amp'
    proc = _run(['tools/train.py', CLS_CFG, '--amp', '--work-dir', work,
                 '--cfg-options'] + _data_opts(shapes))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = next(work.glob('*/vis_data/config.py')).read_text()
    assert "type='CPUAutocastOptimWrapper'" in config
    scalars = [json.loads(line) for line in next(work.glob('*/vis_data/scalars.json')).open()]
    losses = [s['loss'] for s in scalars if 'loss' in s]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses), losses
    first, second = (torch.load(work / f'epoch_{i}.pth', weights_only=True)['state_dict']
                     for i in (1, 2))
    assert all(v.dtype != torch.bfloat16 for v in second.values())  # the weights stay float32
    moved = [k for k in first if first[k].is_floating_point()
             and not torch.equal(first[k], second[k])]
    assert any(k.endswith('.weight_kxk') for k in moved)
    assert any(k.endswith('.scales') for k in moved)


def test_amp_float16_on_the_cpu_is_refused(tmp_path):
    proc = _run(['tools/train.py', CLS_CFG, '--amp', '--work-dir', tmp_path / 'w',
                 '--cfg-options', 'optim_wrapper.dtype=float16'])
    if torch.cuda.is_available():
        pytest.skip('float16 is fine on a GPU')
    _assert_clean_failure(proc, 'float16')


# 8. The demo config under mmpretrain's own tools/train.py --------------------------------------
@pytest.mark.skipif(not MMPRETRAIN_TRAIN.is_file(), reason='mmpretrain ships no tools/train.py')
def test_demo_config_runs_under_mmpretrains_own_train_script(tmp_path, shapes):
    work = tmp_path / 'mmpretrain_train'
    proc = _run([MMPRETRAIN_TRAIN, CLS_CFG, '--work-dir', work, '--cfg-options'] +
                _data_opts(shapes) + ['train_cfg.max_epochs=1'], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = next(work.glob('*/*.log')).read_text()
    assert 'Epoch(train) [1][2/2]' in log
    state = torch.load(work / 'epoch_1.pth', weights_only=True)['state_dict']
    assert any(k.endswith('.weight_kxk') for k in state)  # OREPA layers, through custom_imports
