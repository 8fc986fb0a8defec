"""The tools as a hostile user meets them: every expected failure is one line on stderr naming the
bad value or path, exit status 1 and no traceback, found before any work (nothing written,
nothing started).

Some tools run in a fresh process (``run_python``), others in this one (``tool_fails``: what
``python tools/X.py`` runs); there an unexpected exception escapes and fails the test, as a
traceback would."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmorepa.ops import branches as B

from helpers import CLS_CFG, ROOT, assert_clean_failure, run_python, without_python_warnings

LONG = 'n' * 300  # longer than NAME_MAX (255) on every Linux file system


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


# Usage errors: argparse's message, one line, exit status 1 (mmorepa.cli.ArgumentParser) ---------
PYTHON_TOOLS = sorted(str(p.relative_to(ROOT)) for folder in ('tools', 'tools/analysis')
                      for p in (ROOT / folder).glob('*.py'))
def test_python_warning_records_are_told_apart_from_the_tools_lines():
    text = ('/site/mmengine/x.py:11: DeprecationWarning: old API\n  from torch import y\n'
            'train: error: bad value\n')
    assert without_python_warnings(text) == 'train: error: bad value\n'
    assert without_python_warnings('train: error: a.py:3: UserWarning: x\n') == \
        'train: error: a.py:3: UserWarning: x\n'


# a tool whose first positional argument is a choice gets a valid one
FIRST_ARGUMENT = {'tools/analysis/measure_memory.py': 'cache'}


@pytest.mark.parametrize('tool', PYTHON_TOOLS)
def test_unknown_option_is_one_line_and_exit_1(tool):
    """Enough placeholders for any tool's positional arguments and ``--out-dir``, then an unknown
    option: argparse names it (the extra placeholders with it) in one line."""
    first = FIRST_ARGUMENT.get(tool, 'x')
    proc = run_python([tool, first, 'x', 'x', 'x', '--out-dir', 'x', '--no-such-option'])
    assert proc.returncode == 1 and proc.stdout == '', (proc.returncode, proc.stderr)
    name, stderr = Path(tool).stem, without_python_warnings(proc.stderr)
    assert stderr.startswith(f'{name}: error: unrecognized arguments: ') and \
        stderr.strip().endswith(' --no-such-option') and \
        len(stderr.strip().splitlines()) == 1, proc.stderr


# Outputs that cannot be written: refused before any work, the output named --------------------
@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
@pytest.mark.parametrize('kind', ['read-only folder', 'parent is a file', 'output is a folder'])
def test_unwritable_output_is_refused_before_any_work(tool, kind, tmp_path, not_a_checkpoint):
    out = _unwritable(kind, tmp_path)
    # the checkpoint is corrupt: had the tool read it first, the message would be about it
    proc = run_python([f'tools/{tool}.py', CLS_CFG, not_a_checkpoint, out])
    line = assert_clean_failure(proc, out)
    assert 'random.pth' not in line and '.tmp' not in line and f'.{out.name}.' not in line
    assert list(tmp_path.rglob('.*')) == []  # no temporary or probe file left behind


def test_test_tool_refuses_a_folder_as_out_before_testing(tmp_path, cls_ckpt):
    (tmp_path / 'metrics').mkdir()
    proc = run_python(['tools/test.py', CLS_CFG, cls_ckpt, '--out', tmp_path / 'metrics',
                       '--work-dir', tmp_path / 'work'])
    assert_clean_failure(proc, tmp_path / 'metrics', 'is a directory')
    assert not (tmp_path / 'work').exists()


def test_train_work_dir_under_a_file(tmp_path):
    (tmp_path / 'a_file').write_text('x')
    proc = run_python(['tools/train.py', CLS_CFG, '--work-dir', tmp_path / 'a_file' / 'work'])
    assert_clean_failure(proc, tmp_path / 'a_file' / 'work', 'not a directory')


def test_convert_official_checkpoint_output_is_a_folder(tmp_path, not_a_checkpoint):
    proc = run_python(['tools/convert_official_checkpoint.py', not_a_checkpoint, tmp_path])
    assert_clean_failure(proc, tmp_path, 'is a directory')


@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
def test_too_long_output_name_is_refused_first(tool, tmp_path, not_a_checkpoint, tool_fails):
    out = tmp_path / f'{LONG}.out'
    tool_fails(tool, [CLS_CFG, not_a_checkpoint, out], 'name too long', LONG)


def test_too_long_names_in_test_and_train(tmp_path, not_a_checkpoint, tool_fails):
    tool_fails('test', [CLS_CFG, not_a_checkpoint, '--out', tmp_path / f'{LONG}.json',
                        '--work-dir', tmp_path / 'w'], 'name too long', LONG)
    tool_fails('train', [CLS_CFG, '--work-dir', tmp_path / LONG / 'w'], 'name too long', LONG)
    assert list(tmp_path.iterdir()) == [not_a_checkpoint]


def test_demo_refuses_a_data_root_it_did_not_generate(tmp_path, tool_fails):
    data = tmp_path / 'data'
    (data / 'coco').mkdir(parents=True)
    (data / 'coco' / 'instances.json').write_text('{}')
    tool_fails('demo', ['--quick', '--data-root', data, '--work-dir', tmp_path / 'w'], data)
    assert (data / 'coco' / 'instances.json').read_text() == '{}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data']  # nothing else was started


def test_branch_similarity_bad_input_is_one_line(tmp_path, tiny_cfg, tiny_ckpt, tool_fails):
    out = tmp_path / 'out'
    tool = 'analysis/branch_similarity'
    tool_fails(tool, [tiny_cfg, tiny_ckpt], 'required: --out-dir')
    tool_fails(tool, [tiny_cfg, tmp_path / 'none.pth', '--out-dir', out], 'checkpoint not found',
               tmp_path / 'none.pth')
    (tmp_path / 'a_file').write_text('x')
    tool_fails(tool, [tiny_cfg, tiny_ckpt, '--out-dir', tmp_path / 'a_file'], tmp_path / 'a_file')
    tool_fails(tool, [tiny_cfg, tiny_ckpt, '--out-dir', out, '--layers', 'no_such_layer'],
               'no multi-branch OREPA layer', 'no_such_layer')
    # an input where an output would go: refused before anything is written
    out.mkdir()
    named_like_output = out / 'summary.json'
    named_like_output.write_bytes(tiny_ckpt.read_bytes())
    tool_fails(tool, [tiny_cfg, named_like_output, '--out-dir', out],
               'refusing to overwrite the input', named_like_output)
    assert list(out.iterdir()) == [named_like_output]
    broken = tmp_path / 'broken.py'
    broken.write_text("model = dict(type='ImageClassifier'\n")
    assert_clean_failure(run_python([f'tools/{tool}.py', broken, tiny_ckpt, '--out-dir', out]),
                         'cannot read config', broken)
    assert list(out.iterdir()) == [named_like_output]


# Input shapes the model cannot take ----------------------------------------------------------
@pytest.mark.parametrize('tool', ['deploy_convert', 'export_onnx'])
@pytest.mark.parametrize('shape', [('0', '3', '64', '64'), ('2', '5', '64', '64')])
def test_bad_input_shape_is_one_line(tool, shape, tmp_path, cls_ckpt):
    out = tmp_path / 'out.pth'
    proc = run_python([f'tools/{tool}.py', CLS_CFG, cls_ckpt, out, '--input-shape', *shape])
    assert_clean_failure(proc, '--input-shape', ' '.join(shape))
    assert not out.exists()


# Checkpoints that are no checkpoints, missing, or do not fit -----------------------------------
def test_random_file_is_not_a_checkpoint_and_no_unsafe_advice(tmp_path, not_a_checkpoint):
    proc = run_python(['tools/deploy_convert.py', CLS_CFG, not_a_checkpoint, tmp_path / 'x.pth'])
    line = assert_clean_failure(proc, not_a_checkpoint, 'not a PyTorch checkpoint')
    assert 'weights_only=False' not in proc.stderr and 'weights_only` set to `False' not in line


def test_mismatched_checkpoint_names_the_key(tmp_path, cls_ckpt):
    state = torch.load(cls_ckpt, weights_only=True)['state_dict']
    key = next(k for k in state if k.endswith('scales') or 'weight' in k)
    state.pop(key)
    torch.save(dict(state_dict=state), tmp_path / 'partial.pth')
    proc = run_python(['tools/export_onnx.py', CLS_CFG, tmp_path / 'partial.pth',
                       tmp_path / 'x.onnx', '--input-shape', '1', '3', '32', '32'])
    assert_clean_failure(proc, f'missing key {key!r}', 'partial.pth')
    assert not (tmp_path / 'x.onnx').exists()


def test_test_tool_missing_checkpoint(tmp_path):
    proc = run_python(['tools/test.py', CLS_CFG, tmp_path / 'none.pth'])
    assert_clean_failure(proc, 'checkpoint not found', tmp_path / 'none.pth')


# Configs that cannot be read, models that do not build ------------------------------------------
def test_train_broken_config_and_missing_resume(tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text("model = dict(type='ImageClassifier'\n")
    assert_clean_failure(run_python(['tools/train.py', broken]), 'cannot read config', broken)
    assert_clean_failure(run_python(['tools/train.py', tmp_path / 'none.py']), 'config not found',
                         tmp_path / 'none.py')
    proc = run_python(['tools/train.py', CLS_CFG, '--resume', tmp_path / 'gone.pth', '--work-dir',
                       tmp_path / 'w'])
    assert_clean_failure(proc, tmp_path / 'gone.pth')


@pytest.mark.parametrize('option,bad', [('model.backbone.reparam=orepaa', 'orepaa'),
                                        ('model.backbone.typo_arg=1', 'typo_arg'),
                                        (f'model.backbone.orepa_cfg.branches={B.KXK.name}',
                                         B.KXK.name),
                                        ('model.backbone.type=NoSuchNet', 'NoSuchNet')])
def test_train_bad_model_option_is_one_line(option, bad, tmp_path, tool_fails):
    tool_fails('train', [CLS_CFG, '--work-dir', tmp_path / 'w', '--cfg-options', option], bad)


def test_test_bad_model_option_is_one_line(tmp_path, tiny_ckpt, tool_fails):
    tool_fails('test', [CLS_CFG, tiny_ckpt, '--work-dir', tmp_path / 'w', '--cfg-options',
                        'model.backbone.typo_arg=1'], 'typo_arg')


# The distributed launchers without their arguments ----------------------------------------------
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
