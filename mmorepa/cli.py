"""What the tools in ``tools/`` share: :func:`run_tool` (expected failures as one line on stderr,
exit status 1), :class:`ToolError`, :class:`ArgumentParser` (usage errors as such failures),
config loading with the work dir and the launcher, and building mmengine's ``Runner``, the one
place where a checkpoint's weights go into a Runner's model. Only the tools import this module;
the library raises :mod:`mmorepa.errors`."""
import argparse
import copy
import os
import os.path as osp
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.config import Config
from mmengine.model import is_model_wrapper

from .checkpoint import load_checkpoint_strict
from .config import build_model_of, read_config
from .errors import MMOrepaError
from .fileio import check_output_dir
from .fusion import reparameterize


class ToolError(Exception):
    """An expected failure of a tool that is no library error (a bad combination of arguments,
    a missing optional dependency): its message names the bad value and is all the user sees."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the tools: a usage error (a missing or unknown argument, a bad
    value) raises :class:`ToolError`, so that :func:`run_tool` prints argparse's message as one
    line with exit status 1, as for any bad input. ``--help`` prints the usage and exits 0."""

    def error(self, message):
        raise ToolError(message)


def run_tool(main, argv=None):
    """Run a tool's ``main(argv)``; an expected failure (a library
    :class:`~mmorepa.errors.MMOrepaError`, a :class:`ToolError` or a ``FileNotFoundError``) ends
    the process with its message as one line on stderr and exit status 1. Anything else is a bug
    and keeps its traceback."""
    # setuptools' notice, raised by mmengine's import of pkg_resources: nothing a user can act on
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)
    try:
        result = main(argv)
    except (MMOrepaError, ToolError, FileNotFoundError) as e:
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
    abort a rank (``terminate called without an active exception``) after a run that
    succeeded, and the launcher then reports the whole run failed."""
    import logging
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def end_distributed():
    """Destroy the default process group, if a launcher made one, once a tool's work is done
    (:func:`run_tool` calls it): left to the interpreter's exit, its threads are torn down in no
    set order."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
    or an unwritable work dir is a :class:`~mmorepa.errors.MMOrepaError`."""
    cfg = read_config(path, cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    check_output_dir(cfg.work_dir)
    return prepare_launch(cfg, launcher)


def check_model_builds(cfg: Config, source) -> None:
    """Build the model of ``cfg`` once, as the Runner will (with the config's
    ``data_preprocessor``), so that a model config that does not build (an unknown type, a bad
    backbone option) is one line naming ``source`` before the Runner starts."""
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get('model'), dict) and cfg.get('data_preprocessor') is not None:
        cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)
    build_model_of(cfg, source)


def runner_model(runner) -> nn.Module:
    """The model of ``runner``, outside any wrapper (DDP)."""
    return runner.model.module if is_model_wrapper(runner.model) else runner.model


def build_runner(cfg: Config, checkpoint=None, fuse: bool = False):
    """mmengine's ``Runner`` of ``cfg``, or the config's own ``runner_type``.

    Without ``checkpoint`` the Runner loads what the config says (``load_from``, ``resume``)
    when it runs. With ``checkpoint`` its model holds that checkpoint's weights when this
    returns: loaded strictly (:func:`~mmorepa.checkpoint.load_checkpoint_strict`: errors name
    the key; a fused checkpoint seeds the OREPA layers) and, with ``fuse``, re-parameterized in
    place; the Runner is built with ``load_from=None`` and ``resume=False`` and so loads nothing
    over them."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    if checkpoint is not None:
        cfg = copy.deepcopy(cfg)
        cfg.load_from, cfg.resume = None, False
    runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
    if checkpoint is not None:
        model = runner_model(runner)
        load_checkpoint_strict(model, checkpoint)
        if fuse:
            reparameterize(model, inplace=True)
    return runner
