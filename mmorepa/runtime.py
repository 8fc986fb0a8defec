"""What the tools need around mmengine's Runner that the Runner does not do itself."""
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
