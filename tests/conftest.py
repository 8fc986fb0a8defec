"""Fixtures shared by the tests: the tools run in this process, generated data, and classifiers
with random weights and their checkpoints. Shared functions are in ``helpers.py``."""
import os

import pytest
import torch

from helpers import CLS_CFG, load_tool, randomize_network_

# The files whose tests take longest (tool processes), collected first: pytest.ini hands whole
# files to two workers in collection order, so these start first and the short files fill the
# workers around them.
LONGEST_FILES = ('test_tools.py', 'test_tool_errors.py', 'test_analysis.py')


def pytest_configure(config):
    """In a worker of pytest-xdist, torch and the tool processes it starts take their share of
    the cores this process may run on (threads beyond it would wait on each other)."""
    workers = os.environ.get('PYTEST_XDIST_WORKER_COUNT')
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
            os.cpu_count() or 1)
        threads = str(max(1, cores // int(workers)))
        for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
            os.environ[name] = threads
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture
def tool_ok():
    """``tool_ok(name, *argv)``: run tool ``name`` in this process as ``python tools/<name>.py``
    runs it (``run_tool``); an unexpected exception escapes and fails the test, as a traceback
    would. Returns what its ``main`` returns."""
    from mmorepa.cli import run_tool

    def ok(name, *argv):
        return run_tool(load_tool(name).main, [str(a) for a in argv])
    return ok


@pytest.fixture
def tool_fails(capsys):
    """``tool_fails(name, argv, *names)``: tool ``name`` run in this process exits with status 1
    and one error line on stderr, its last line, naming each of ``names``; returns that line."""
    from mmorepa.cli import run_tool

    def fails(name, argv, *names):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run_tool(load_tool(name).main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 1, err
        errors = [line for line in err.splitlines() if 'error:' in line]
        assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
        for n in names:
            assert str(n) in errors[0], (n, errors[0])
        return errors[0]
    return fails


@pytest.fixture
def not_a_checkpoint(tmp_path):
    """A file of bytes that is neither a zip archive nor a pickle."""
    path = tmp_path / 'random.pth'
    path.write_bytes(bytes(range(256)) * 8)
    return path


@pytest.fixture(scope='session')
def shapes_data(tmp_path_factory):
    """The generated shapes data set, 16 training and 8 validation images per task."""
    from mmorepa.datasets import make_shapes_dataset
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(root, num_train=16, num_val=8)
    return root


@pytest.fixture(scope='session')
def cls_ckpt(tmp_path_factory):
    """A checkpoint of the demo classifier (``CLS_CFG``; random weights, random BN statistics)."""
    from mmorepa.config import build_model, read_config
    path = tmp_path_factory.mktemp('ckpt') / 'cls.pth'
    model = build_model(read_config(CLS_CFG))
    randomize_network_(model, torch.Generator().manual_seed(0))
    torch.save(dict(state_dict=model.state_dict()), path)
    return path


@pytest.fixture(scope='session')
def tiny_cfg(tmp_path_factory):
    """The demo classifier with a quarter of its block width (the stem keeps its 32 channels: a
    plain 7x7 stem factors exactly into its 3x3 generators), tested on a few generated images
    with per-class metrics (a list per metric)."""
    from mmorepa.datasets import make_shapes_dataset
    base = tmp_path_factory.mktemp('tiny')
    data = make_shapes_dataset(base / 'shapes', num_train=3, num_val=6, size=32)
    cfg = base / 'tiny_cls.py'
    cfg.write_text(f'''_base_ = '{CLS_CFG}'
model = dict(backbone=dict(base_channels=8), head=dict(in_channels=64))
test_dataloader = dict(dataset=dict(data_root='{data}/cls'))
test_evaluator = [dict(type='Accuracy'), dict(type='SingleLabelMetric', average=None)]
''')
    return cfg


@pytest.fixture(scope='session')
def tiny_model(tiny_cfg):
    """The model of ``tiny_cfg``, random weights and BN statistics, in eval mode."""
    from mmorepa.config import build_model, read_config
    model = build_model(read_config(tiny_cfg))
    return randomize_network_(model, torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope='session')
def tiny_ckpt(tiny_model, tiny_cfg):
    """A checkpoint of ``tiny_model``."""
    path = tiny_cfg.parent / 'cls.pth'
    torch.save(dict(state_dict=tiny_model.state_dict()), path)
    return path


@pytest.fixture(scope='session')
def tiny_fused(tiny_ckpt, tiny_cfg):
    """deploy_convert's fused checkpoint of ``tiny_ckpt`` and its deploy config (beside it)."""
    from mmorepa.cli import run_tool
    out = tiny_ckpt.parent / 'fused' / 'fused.pth'
    run_tool(load_tool('deploy_convert').main, [str(tiny_cfg), str(tiny_ckpt), str(out),
                                                '--input-shape', '1', '3', '32', '32'])
    return out
