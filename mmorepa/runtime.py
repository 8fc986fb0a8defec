"""What the tools need around mmengine's Runner that the Runner does not do itself."""
import os.path as osp
from typing import Optional

import torch
import torch.distributed as dist
from mmengine.config import Config


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
        raise SystemExit(f'--launcher {launcher} needs CUDA; on the CPU use --launcher pytorch')
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
    ``./work_dirs/<config name>``), the launcher prepared. A missing file is a clear error."""
    if not osp.isfile(path):
        raise SystemExit(f'config not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(path))[0])
    return prepare_launch(cfg, launcher)


def build_runner(cfg: Config):
    """mmengine's ``Runner``, or the config's own ``runner_type``."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
