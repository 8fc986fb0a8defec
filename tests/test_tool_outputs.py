"""What the tools write: atomically, with the permissions the umask gives any new file, under any
legal name; never over a file the user did not name as the output (a deploy config is replaced
only if the tool wrote it, a data root only if it holds a data set generated there); metrics as
JSON, per-class lists included."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CLS_CFG, load_tool, run_python
from mmorepa.datasets import make_shapes_dataset
from mmorepa.deploy import DEPLOY_CONFIG_HEADER
from mmorepa.errors import PathError
from mmorepa.fileio import atomic_write

SHAPE = ['--input-shape', '1', '3', '32', '32']


# atomic_write ----------------------------------------------------------------------------------
def test_atomic_write_names_the_output_not_the_temporary_file(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    with pytest.raises(PathError, match=f'cannot write {tmp_path / "a_file" / "x.json"}'):
        atomic_write(tmp_path / 'a_file' / 'x.json', lambda p: Path(p).write_text('{}'))

    def failing_write(p):
        raise OSError(28, 'No space left on device', p)  # what a full disk gives, on the tmp file
    with pytest.raises(PathError) as e:
        atomic_write(tmp_path / 'out.json', failing_write)
    assert str(tmp_path / 'out.json') in str(e.value) and 'No space left' in str(e.value)
    assert '.out.json.' not in str(e.value)
    assert list(tmp_path.iterdir()) == [tmp_path / 'a_file']  # no temporary file left


@pytest.mark.parametrize('umask', [0o022, 0o027, 0o002])
def test_atomic_write_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / 'x.json', lambda p: Path(p).write_text('{}'))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_takes_any_legal_name(tmp_path):
    path = tmp_path / ('m' * 250 + '.json')  # legal: 255 bytes
    atomic_write(path, lambda p: Path(p).write_text('{}'))
    assert path.read_text() == '{}' and list(tmp_path.iterdir()) == [path]


# deploy_convert: its two outputs ----------------------------------------------------------------
def test_deploy_convert_outputs_are_readable_by_others_under_umask_022(tmp_path, cls_ckpt):
    out = tmp_path / 'deploy' / 'fused.pth'
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, cls_ckpt, out, '--input-shape', '1',
                       '3', '32', '32'], umask=0o022)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.with_suffix('.py').stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ['fused.pth', 'fused.py']


def test_deploy_convert_never_replaces_a_config_it_did_not_write(tmp_path, tiny_cfg, tiny_ckpt,
                                                                 tool_ok, tool_fails):
    out = tmp_path / 'model.pth'
    (tmp_path / 'model.py').write_text('# my model\n')
    tool_fails('deploy_convert', [tiny_cfg, tiny_ckpt, out] + SHAPE, tmp_path / 'model.py')
    assert not out.exists() and (tmp_path / 'model.py').read_text() == '# my model\n'
    # named with --out-config, it goes there
    tool_ok('deploy_convert', tiny_cfg, tiny_ckpt, out, '--out-config', tmp_path / 'deploy.py',
            *SHAPE)
    assert (tmp_path / 'model.py').read_text() == '# my model\n'
    written = (tmp_path / 'deploy.py').read_text()
    assert written.startswith(DEPLOY_CONFIG_HEADER) and "type='ResNet'" in written
    assert 'mmorepa' not in written  # a deploy config needs no mmorepa
    assert out.is_file()


def test_deploy_convert_replaces_its_own_deploy_config(tiny_fused, tiny_cfg, tmp_path, tool_ok):
    """A second run to the same output (the demo run again) replaces the deploy config it wrote:
    the fused checkpoint converted again with the training config."""
    out = tmp_path / 'fused.pth'
    (tmp_path / 'fused.py').write_text(f'{DEPLOY_CONFIG_HEADER} from an earlier run\nx = 1\n')
    _, _, err = tool_ok('deploy_convert', tiny_cfg, tiny_fused, out, *SHAPE)
    assert err <= 1e-5
    assert "type='ResNet'" in (tmp_path / 'fused.py').read_text()


# branch_similarity: its files in the folder named, each written atomically ----------------------
def test_branch_similarity_writes_only_in_its_out_dir(tiny_cfg, tiny_ckpt, tmp_path, tool_ok):
    out = tmp_path / 'branches'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    beside_checkpoint = sorted(tiny_ckpt.parent.iterdir())
    layer = 'backbone.layer1.0.conv2'
    _, summary = tool_ok('analysis/branch_similarity', tiny_cfg, tiny_ckpt, '--out-dir', out,
                         '--layers', 'layer1.0.conv2')
    assert list(summary) == [layer]
    assert sorted(p.name for p in out.iterdir()) == [
        f'{layer}_cosine.png', f'{layer}_norms.png', 'notes.txt', 'summary.json']
    assert (out / 'notes.txt').read_text() == 'mine'
    assert all((out / f'{layer}_{kind}.png').read_bytes().startswith(b'\x89PNG')
               for kind in ('cosine', 'norms'))
    assert json.loads((out / 'summary.json').read_text()) == summary
    assert sorted(tiny_ckpt.parent.iterdir()) == beside_checkpoint
    # a second run replaces each file by a rename (a new file), never rewriting it in place
    inode = (out / 'summary.json').stat().st_ino
    keep = (out / 'summary.json').open()  # holds the old inode, so it cannot be reused
    try:
        tool_ok('analysis/branch_similarity', tiny_cfg, tiny_ckpt, '--out-dir', out,
                '--layers', 'layer1.0.conv2')
        assert (out / 'summary.json').stat().st_ino != inode
    finally:
        keep.close()


# test.py --out: every metric as JSON, per-class lists included -----------------------------------
def test_as_json_converts_per_class_metrics():
    as_json = load_tool('test').as_json
    metrics = {'a': torch.tensor(0.5), 'b': torch.tensor([1.0, 2.0]), 'c': np.float32(3.0),
               'd': [torch.tensor(1.0), np.array([2.0, 3.0])], 'e': 4}
    assert json.loads(json.dumps({k: as_json(v) for k, v in metrics.items()})) == {
        'a': 0.5, 'b': [1.0, 2.0], 'c': 3.0, 'd': [1.0, [2.0, 3.0]], 'e': 4.0}


def test_test_tool_fused_checkpoint_and_per_class_metrics(tiny_fused, tiny_cfg, tmp_path):
    out = tmp_path / 'metrics.json'
    proc = run_python(['tools/test.py', tiny_cfg, tiny_fused, '--work-dir', tmp_path / 'w',
                       '--out', out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert len(metrics['single-label/precision_classwise']) == 3
    assert 0 <= metrics['accuracy/top1'] <= 100


# the shapes data set: generated under a data root, replacing only what it generated there --------
def test_shapes_dataset_replaces_only_its_own_data(tmp_path):
    root = tmp_path / 'shapes'
    root.mkdir()  # an empty folder may be used
    make_shapes_dataset(root, num_train=3, num_val=3, size=16)
    assert sorted(p.name for p in root.iterdir()) == ['.complete', 'cls', 'det', 'seg']
    make_shapes_dataset(root, num_train=4, num_val=3, size=16)  # ours, other parameters: redone
    assert len(list((root / 'det' / 'train').iterdir())) == 4
    (root / 'notes.txt').write_text('mine')
    with pytest.raises(PathError, match='notes.txt'):
        make_shapes_dataset(root, num_train=5, num_val=3, size=16)
    assert (root / 'notes.txt').read_text() == 'mine'
    make_shapes_dataset(root, num_train=4, num_val=3, size=16)  # the same set: reused as it is
    assert (root / 'notes.txt').exists()
