"""What the tools need around mmengine's Runner that the Runner does not do itself: config loading,
the launcher on CPU-only machines, mixed precision on the CPU, and checks of arguments and output
locations that turn expected failures into one line on stderr."""
import copy
import os
import os.path as osp
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


class ToolError(Exception):
    """An expected failure of a tool (missing or unreadable input, bad argument, unwritable
    output, bad config): its message names the bad value or path and is all the user sees."""


def run_tool(main, argv=None):
    """Run a tool's ``main(argv)``; an expected failure (:class:`ToolError`, which
    ``CheckpointError`` is, or ``FileNotFoundError``) ends the process with its message as one
    line on stderr and exit status 1. Anything else is a bug and keeps its traceback."""
    # setuptools' notice, raised by mmengine's import of pkg_resources: nothing a user can act on
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    try:
        result = main(argv)
    except (ToolError, FileNotFoundError) as e:
        name = osp.splitext(osp.basename(sys.argv[0]))[0] or 'mmorepa'
        message = ' '.join(str(e).splitlines())
        print(f'{name}: error: {message}', file=sys.stderr)
        raise SystemExit(1)
    end_distributed()
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        exit_rank()
    return result


def exit_rank():
    """End a launched rank whose work is done (outputs written, process group destroyed) with
    status 0 without the interpreter's teardown: torch's C++ destructors at exit intermittently
    abort a rank (``terminate called without an active exception``, 4 of 24 two-process runs
    here) after a run that succeeded, and the launcher then reports the whole run failed."""
    import logging
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def check_input_file(path, what: str = 'file') -> Path:
    """``path`` as a ``Path`` if it is a readable file; else :class:`ToolError` naming it."""
    path = Path(path)
    if not path.exists():
        raise ToolError(f'{what} not found: {path}')
    if not path.is_file():
        raise ToolError(f'{what} {path} is not a file')
    if not os.access(path, os.R_OK):
        raise ToolError(f'{what} {path} is not readable')
    return path


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new path would be made in)."""
    path = Path(os.path.abspath(path))
    while not os.path.exists(path):  # False for a name too long, where Path.exists raises
        path = path.parent
    return path


def _check_can_create_in(path: Path, target: Path, what: str) -> None:
    """``target`` (a new file or folder) can be made from ``path``, its closest existing
    ancestor: a folder in which we can create files. Tried for real (a temporary file), since
    permission bits do not tell for root or read-only file systems."""
    if not path.is_dir():
        raise ToolError(f'cannot write {what} {target}: {path} is not a directory')
    try:
        fd, probe = tempfile.mkstemp(prefix='.mmorepa-probe-', dir=path)
    except OSError as e:
        raise ToolError(f'cannot write {what} {target}: {path} is not writable '
                        f'({e.strerror})') from None
    os.close(fd)
    os.unlink(probe)


def check_name_lengths(path, what: str = 'output') -> Path:
    """Refuse a path with a name longer than the file system allows (``NAME_MAX`` bytes, 255 on
    Linux file systems) or too long as a whole (``PATH_MAX``): the tools find it before any work,
    not after it."""
    path = Path(path)
    parent = _nearest_existing(path.parent)
    name_max = _pathconf(parent, 'PC_NAME_MAX', 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ToolError(f'{what} name too long ({size} bytes, the file system allows '
                            f'{name_max}): {part}')
    path_max = _pathconf(parent, 'PC_PATH_MAX', 4096)
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= path_max:
        raise ToolError(f'{what} path too long ({size} bytes, the limit is {path_max - 1}): {path}')
    return path


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def check_output_file(path, inputs: Sequence = (), what: str = 'output') -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under
    a file, a folder we may not write in, a name too long, or one of the tool's ``inputs``."""
    path = Path(path)
    if str(path) == '':
        raise ToolError(f'{what} path is empty')
    check_name_lengths(path, what)
    if path.is_dir():
        raise ToolError(f'{what} {path} is a directory')
    for src in inputs:
        src = Path(src)
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise ToolError(f'refusing to overwrite the input {src} with the {what}')
    if path.exists() and not os.access(path, os.W_OK):
        raise ToolError(f'cannot write {what} {path}: it is read-only')
    _check_can_create_in(_nearest_existing(path.parent), path, what)
    return path


def check_output_dir(path, what: str = 'work dir') -> Path:
    """Refuse, before any work, an output folder that is a file, has too long a name, or cannot
    be made or written."""
    path = Path(path)
    check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise ToolError(f'{what} {path} is not a directory')
    _check_can_create_in(_nearest_existing(path), path, what)
    return path


def check_input_shape(shape) -> tuple:
    """An input shape ``(N, C, H, W)`` of positive ints, or :class:`ToolError` naming it."""
    shape = tuple(shape)
    if len(shape) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                              for v in shape):
        raise ToolError(f'--input-shape must be four positive ints N C H W, got '
                        f'{" ".join(str(v) for v in shape)}')
    return shape


def read_config(path, cfg_options: Optional[dict] = None) -> Config:
    """``Config.fromfile(path)`` with ``--cfg-options`` merged; a missing or broken config file is
    a :class:`ToolError` naming it. A config without ``default_scope`` gets the scope its model
    type names (:func:`_scope_of_model`)."""
    path = check_input_file(path, 'config')
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:  # the user's file: a syntax error, a bad _base_, a missing import
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ToolError(f'cannot read config {path}: {type(e).__name__}: {first}') from None
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except Exception as e:
            raise ToolError(f'cannot apply --cfg-options {cfg_options} to {path}: {e}') from None
    if cfg.get('default_scope', None) is None and isinstance(cfg.get('model', None), dict):
        cfg.default_scope = _scope_of_model(cfg.model)
    return cfg


def _scope_of_model(model: dict) -> str:
    """The scope of a config without ``default_scope``: the toolbox of its fully qualified model
    type (``'mmpretrain.ImageClassifier'`` -> ``'mmpretrain'``), else ``'mmengine'`` (the root
    registries, which is what no scope means to mmengine)."""
    kind = model.get('type')
    if isinstance(kind, str) and '.' in kind:
        return kind.split('.', 1)[0]
    return 'mmengine'


def prepare_launch(cfg: Config, launcher: str) -> Config:
    """Make ``--launcher pytorch`` work on machines without CUDA as well.

    mmengine's pytorch launcher calls ``torch.cuda.set_device`` and wraps the model with
    ``device_ids=[LOCAL_RANK]``; both fail on a CPU. Without CUDA we open the process group
    ourselves (backend ``gloo``; mmengine then leaves it alone) and give DDP no device ids.
    """
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return cfg
    if launcher != 'pytorch':
        raise ToolError(f'--launcher {launcher} needs CUDA; on the CPU use --launcher pytorch')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.setdefault('type', 'MMDistributedDataParallel')
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    return cfg


def load_config(path: str, launcher: str = 'none', cfg_options: Optional[dict] = None,
                work_dir: Optional[str] = None) -> Config:
    """A config as the tools use it: ``--cfg-options`` merged, the work dir set (default
    ``./work_dirs/<config name>``) and checked, the launcher prepared. A missing or broken file
    or an unwritable work dir is a :class:`ToolError`."""
    cfg = read_config(path, cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    check_output_dir(cfg.work_dir)
    return prepare_launch(cfg, launcher)


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """Mixed precision on the CPU: the forward pass runs under ``torch.autocast('cpu',
    dtype=torch.bfloat16)`` (what autocast allows there); parameters, gradients and the
    optimizer stay float32. bfloat16 has float32's exponent range, so no loss scaling is needed.
    OREPA layers compute their kernels in float32 and convolve in bfloat16."""

    def __init__(self, dtype='bfloat16', **kwargs):
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ToolError(f'CPU autocast supports dtype bfloat16 only, got {dtype}')
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield


def amp_optim_wrapper(optim_wrapper: dict, cuda: bool) -> dict:
    """The ``optim_wrapper`` config for ``--amp``: mmengine's ``AmpOptimWrapper`` on a GPU,
    :class:`CPUAutocastOptimWrapper` (bfloat16 autocast) on the CPU. Other wrapper types and
    float16 on the CPU are refused with a :class:`ToolError`."""
    optim_wrapper = dict(optim_wrapper)
    kind = optim_wrapper.get('type', 'OptimWrapper')
    if kind not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
        raise ToolError(f'--amp needs OptimWrapper or AmpOptimWrapper, got {kind}')
    if cuda:
        optim_wrapper['type'] = 'AmpOptimWrapper'
        optim_wrapper.setdefault('loss_scale', 'dynamic')
        return optim_wrapper
    dtype = optim_wrapper.pop('dtype', None)
    if dtype not in (None, 'bfloat16'):
        raise ToolError(f'mixed precision on the CPU runs in bfloat16; optim_wrapper.dtype={dtype} '
                        'needs a GPU')
    optim_wrapper.pop('loss_scale', None)
    optim_wrapper.pop('use_fsdp', None)
    optim_wrapper['type'] = 'CPUAutocastOptimWrapper'
    return optim_wrapper


def check_model_builds(cfg: Config, source) -> None:
    """Build the model of ``cfg`` once, as the Runner will (with the config's
    ``data_preprocessor``), so that a model config that does not build (an unknown type, a bad
    backbone option) is one line naming ``source`` before the Runner starts."""
    from .deploy import build_model_of
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get('model'), dict) and cfg.get('data_preprocessor') is not None:
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    build_model_of(cfg, source)


def end_distributed():
    """Destroy the default process group, if a launcher made one, once a tool's work is done
    (:func:`run_tool` calls it): left to the interpreter's exit, its threads are torn down in no
    set order."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def build_runner(cfg: Config):
    """mmengine's ``Runner``, or the config's own ``runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
