"""Installing mmorepa: a standard build that needs neither torch nor a compiler, a declared torch
minimum, and the optional C++ extension, imported only where its build record fits the running
torch; without it the squeeze runs on torch's operators and says so in one line."""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import mmorepa
from mmorepa import compat
from mmorepa.ops import extension

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mmorepa.__file__).resolve().parent
BINARY = '_squeeze_cpu' + importlib.machinery.EXTENSION_SUFFIXES[0]

# A user's first session: train an OREPA layer on the CPU, fuse it, and check the fused conv.
TRAIN_AND_FUSE = r"""
import sys
import torch
import torch.nn as nn
import mmorepa
from mmorepa.ops import extension
torch.manual_seed(0)
layer = mmorepa.OREPAConv2d(4, 8, 3, norm_cfg=dict(type='BN'))
opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
x = torch.randn(4, 4, 8, 8)
for _ in range(3):
    opt.zero_grad()
    layer(x).square().mean().backward()
    opt.step()
layer.eval()
fused = mmorepa.reparameterize(layer)
assert type(fused) is nn.Conv2d, type(fused)
with torch.no_grad():
    err = ((fused(x) - layer(x)).norm() / layer(x).norm()).item()
assert err < 1e-5, err
assert ('mmorepa._squeeze_cpu' in sys.modules) == (extension.squeeze_cpu is not None)
print('trained and fused from', mmorepa.__file__)
print('reason:', extension.unavailable_reason())
"""


def _package_copy(dst: Path) -> Path:
    """The package's Python sources under ``dst`` (no binary, no build record)."""
    shutil.copytree(PACKAGE, dst / 'mmorepa',
                    ignore=shutil.ignore_patterns('*.so', '*.so.json', '__pycache__'))
    return dst / 'mmorepa'


def _run(code: str, path: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports mmorepa from ``path``."""
    env = dict(os.environ, PYTHONPATH=str(path))
    env.pop('PYTHONWARNINGS', None)
    return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _lines_about_extension(proc) -> list:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if '_squeeze_cpu' in ln and not ln.startswith('reason:')]


def _assert_trained_with_one_line(proc, reason: str):
    assert proc.returncode == 0, proc.stderr
    assert 'trained and fused' in proc.stdout
    said = _lines_about_extension(proc)
    assert len(said) == 1, said
    assert reason in said[0] and 'MMOREPA_BUILD_EXT=1 pip install' in said[0], said[0]


def test_without_the_extension_a_layer_trains_and_fuses_with_one_line(tmp_path):
    _package_copy(tmp_path / 'site')
    proc = _run(TRAIN_AND_FUSE, tmp_path / 'site', tmp_path)
    _assert_trained_with_one_line(proc, '(not built)')
    assert 'circular import' not in proc.stderr


def _fake_binary(package: Path, record: dict):
    """A file named as the extension that is no loadable library: importing it fails."""
    (package / BINARY).write_bytes(b'not a shared library; importing it raises ImportError\n')
    (package / (BINARY + extension.RECORD_SUFFIX)).write_text(json.dumps(record))


@pytest.mark.parametrize('field, value, reason', [
    ('torch', '2.4.0+fake', 'built against torch 2.4.0+fake, running torch'),
    ('cxx11_abi', not torch.compiled_with_cxx11_abi(), 'built with _GLIBCXX_USE_CXX11_ABI='),
    ('source_sha256', '0' * 64, 'built from another version of squeeze_cpu.cpp'),
    ('compile_args', ['-O0'], "built with compiler flags ['-O0']"),
])
def test_a_mismatched_binary_is_never_imported(tmp_path, field, value, reason):
    """The record says another torch, ABI or source: the binary is not imported (importing this
    fake would fail with another reason), the layer trains on torch's operators, one line."""
    package = _package_copy(tmp_path / 'site')
    _fake_binary(package, dict(extension.build_record(), **{field: value}))
    proc = _run(TRAIN_AND_FUSE, tmp_path / 'site', tmp_path)
    _assert_trained_with_one_line(proc, reason)


def test_a_binary_without_its_record_is_not_imported(tmp_path):
    package = _package_copy(tmp_path / 'site')
    (package / BINARY).write_bytes(b'not a shared library\n')
    proc = _run(TRAIN_AND_FUSE, tmp_path / 'site', tmp_path)
    _assert_trained_with_one_line(proc, f'{BINARY} has no build record')


def test_a_binary_whose_record_fits_is_imported(tmp_path):
    """The control of the tests above: with a fitting record the loader does import the binary
    (here a fake one, whose import error becomes the reason)."""
    package = _package_copy(tmp_path / 'site')
    _fake_binary(package, extension.build_record())
    proc = _run('from mmorepa.ops import extension; print(extension.unavailable_reason())',
                tmp_path / 'site', tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert str(package / BINARY) in proc.stdout  # the loader's error naming the file it opened


def test_the_built_extension_carries_a_fitting_record():
    """Where the extension is loaded, its record beside it names the running torch."""
    if extension.squeeze_cpu is None:
        pytest.skip(f'extension not loaded: {extension.unavailable_reason()}')
    record = json.loads(Path(extension.squeeze_cpu.__file__ + extension.RECORD_SUFFIX).read_text())
    assert record == extension.build_record()


@pytest.mark.parametrize('version, refused', [
    ('2.3.1', True), ('1.13.0', True), ('2.4.0', False), ('2.4.0a0+git1234', False),
    ('2.10.0+cpu', False), ('3.0', False)])
def test_an_older_torch_is_refused_in_one_line(version, refused):
    if not refused:
        compat.check_torch(version)
        return
    with pytest.raises(ImportError) as err:
        compat.check_torch(version)
    assert str(err.value).splitlines() == [
        f'mmorepa needs torch >= {compat.TORCH_MINIMUM}, found torch {version}: '
        f'pip install "torch>={compat.TORCH_MINIMUM}"']


SDIST_HOLDS = ['pyproject.toml', 'setup.py', 'MANIFEST.in', 'README.md', 'pytest.ini',
               'requirements/torch.txt', 'mmorepa/csrc/squeeze_cpu.cpp', 'mmorepa/ops/extension.py',
               'tests/test_install.py', 'tests/helpers.py', 'configs/demo/orepa_r18_shapes_cls.py',
               'tools/setup_env.sh', 'tools/check_oldest_stack.sh']


def test_sdist_then_wheel_without_torch_or_compiler(tmp_path):
    """``python -m build`` with build isolation (no torch there) and no compiler (CC, CXX
    /bin/false) makes an sdist holding what building and testing need, and from it a pure wheel
    declaring torch's minimum; installed beside this torch, it trains and fuses a layer, with one
    line about the missing extension."""
    src = tmp_path / 'src'
    src.mkdir()
    for name in ['pyproject.toml', 'setup.py', 'MANIFEST.in', 'README.md', 'pytest.ini']:
        shutil.copy2(ROOT / name, src / name)
    for name in ['mmorepa', 'requirements', 'tests', 'configs', 'tools', 'docs']:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns(
            '*.so', '*.so.json', '__pycache__', '*.egg-info'))
    env = dict(os.environ, CC='/bin/false', CXX='/bin/false')
    env.pop('MMOREPA_BUILD_EXT', None)
    proc = subprocess.run([sys.executable, '-m', 'build', '--outdir', str(tmp_path / 'dist'),
                           str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    sdist, = (tmp_path / 'dist').glob('mmorepa-*.tar.gz')
    with tarfile.open(sdist) as tar:
        names = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
    assert not [n for n in SDIST_HOLDS if n not in names]

    wheel, = (tmp_path / 'dist').glob('mmorepa-*.whl')
    assert wheel.name.endswith('-py3-none-any.whl')
    with zipfile.ZipFile(wheel) as whl:
        meta_name, = [n for n in whl.namelist() if n.endswith('.dist-info/METADATA')]
        meta = Parser().parsestr(whl.read(meta_name).decode())
        assert not [n for n in whl.namelist() if n.endswith(('.so', '.pyd'))]
    assert f'torch>={compat.TORCH_MINIMUM}' in meta.get_all('Requires-Dist')
    assert meta['Version'] == mmorepa.__version__

    site = tmp_path / 'site'
    pip = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    proc = _run(TRAIN_AND_FUSE, site, tmp_path)
    _assert_trained_with_one_line(proc, '(not built)')
    assert f'from {site}' in proc.stdout
