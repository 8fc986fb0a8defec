"""The optional C++ extension ``mmorepa._squeeze_cpu`` (``mmorepa/csrc/squeeze_cpu.cpp``): the
OREPA squeeze's memory-bound branches in one pass each way on the CPU.

``squeeze_cpu`` is the loaded module, or ``None``; :func:`unavailable_reason` says why it is
``None``. A build writes a record beside the binary (``<binary>.json``: the torch version and C++
ABI it was compiled against, the hash of its source and the compiler flags); the binary is imported
only when that record matches the running torch, the flags of :data:`COMPILE_ARGS` (and, in a
source tree, the current source), so a binary built for another torch is never loaded. Without
it the squeeze runs on torch's operators (the path of every other device) and
:func:`warn_unavailable` says so once per process, in one line.
"""
import hashlib
import importlib.machinery
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

NAME = 'mmorepa._squeeze_cpu'
SOURCE = Path(__file__).resolve().parents[1] / 'csrc' / 'squeeze_cpu.cpp'
BUILD_COMMAND = 'MMOREPA_BUILD_EXT=1 pip install --no-build-isolation -e .'
RECORD_SUFFIX = '.json'
# the compiler flags of a build; OpenMP (Linux) runs at::parallel_for's loops on torch's threads
_OPENMP = ['-fopenmp'] if sys.platform.startswith('linux') else []
COMPILE_ARGS = ['-O3', '-Wno-psabi'] + _OPENMP
LINK_ARGS = list(_OPENMP)

__all__ = ['squeeze_cpu', 'unavailable_reason', 'warn_unavailable', 'build_record']


def build_record(source: Path = SOURCE) -> dict:
    """What a binary of the extension depends on: the running torch's version and C++ ABI, the
    hash of its source and the compiler flags. A build writes it beside the binary; loading
    compares it."""
    return {'torch': torch.__version__, 'cxx11_abi': bool(torch.compiled_with_cxx11_abi()),
            'source_sha256': hashlib.sha256(source.read_bytes()).hexdigest(),
            'compile_args': COMPILE_ARGS}


def _mismatch(record: dict) -> Optional[str]:
    """Why a binary with this build record must not be loaded here, or ``None``."""
    if record.get('torch') != torch.__version__:
        return f"built against torch {record.get('torch')}, running torch {torch.__version__}"
    if record.get('cxx11_abi') != bool(torch.compiled_with_cxx11_abi()):
        return f"built with _GLIBCXX_USE_CXX11_ABI={int(bool(record.get('cxx11_abi')))}, " \
               f'running torch has {int(torch.compiled_with_cxx11_abi())}'
    if SOURCE.is_file() and record.get('source_sha256') != build_record()['source_sha256']:
        return f'built from another version of {SOURCE.name}'
    if record.get('compile_args') != COMPILE_ARGS:
        return f"built with compiler flags {record.get('compile_args')}, not {COMPILE_ARGS}"
    return None


def _load():
    """``(module, None)``, or ``(None, reason)`` without importing a binary that does not fit.
    Only the package's own folder is searched: a binary of another copy of mmorepa (an editable
    install elsewhere) is not this package's."""
    spec = importlib.machinery.PathFinder.find_spec(NAME, [str(SOURCE.parents[1])])
    if spec is None or spec.origin is None:
        return None, 'not built'
    record_path = Path(spec.origin + RECORD_SUFFIX)
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return None, f'{Path(spec.origin).name} has no build record {record_path.name} beside it'
    except (OSError, ValueError) as err:
        return None, f'unreadable build record {record_path}: ' + ' '.join(str(err).split())
    reason = _mismatch(record)
    if reason is not None:
        return None, reason
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as err:
        return None, ' '.join(str(err).split())
    sys.modules[NAME] = module
    return module, None


squeeze_cpu, _reason = _load()
_warned = False


def unavailable_reason() -> Optional[str]:
    """Why :data:`squeeze_cpu` is ``None`` (one line), or ``None`` when it is loaded."""
    return _reason


def warn_unavailable() -> None:
    """Say, once per process and in one line, that OREPA squeezes on the CPU run on torch's
    operators, why, and the command that builds the extension; nothing when it is loaded."""
    global _warned
    if _reason is None or _warned:
        return
    _warned = True
    # line 0: the warning is this one line, without a source line under it
    warnings.warn_explicit(
        f'{NAME} not loaded ({_reason}): OREPA squeezes on the CPU run on torch\'s operators, '
        f'several times slower; build it in the source tree with `{BUILD_COMMAND}` '
        '(tools/setup_env.sh does)', RuntimeWarning, filename=__file__, lineno=0,
        module=__name__)
