"""Mixed precision on the CPU as well as on a GPU: :class:`CPUAutocastOptimWrapper` (registered in
mmengine's ``OPTIM_WRAPPERS``) and :func:`amp_optim_wrapper`, the ``optim_wrapper`` config that
``tools/train.py --amp`` uses."""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from .errors import ConfigError


@OPTIM_WRAPPERS.register_module()
class CPUAutocastOptimWrapper(OptimWrapper):
    """Mixed precision on the CPU: the forward pass runs under ``torch.autocast('cpu',
    dtype=torch.bfloat16)`` (what autocast allows there); parameters, gradients and the
    optimizer stay float32. bfloat16 has float32's exponent range, so no loss scaling is needed.
    OREPA layers compute their kernels in float32 and convolve in bfloat16."""

    def __init__(self, dtype='bfloat16', **kwargs):
        if dtype not in ('bfloat16', torch.bfloat16):
            raise ConfigError(f'CPU autocast supports dtype bfloat16 only, got {dtype}')
        super().__init__(**kwargs)
        self.cast_dtype = torch.bfloat16

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield


def amp_optim_wrapper(optim_wrapper: dict, cuda: bool) -> dict:
    """The ``optim_wrapper`` config for mixed precision: mmengine's ``AmpOptimWrapper`` on a GPU,
    :class:`CPUAutocastOptimWrapper` (bfloat16 autocast) on the CPU. Other wrapper types and
    float16 on the CPU are refused with a :class:`ConfigError`."""
    optim_wrapper = dict(optim_wrapper)
    kind = optim_wrapper.get('type', 'OptimWrapper')
    if kind not in ('OptimWrapper', 'AmpOptimWrapper', 'CPUAutocastOptimWrapper'):
        raise ConfigError(f'--amp needs OptimWrapper or AmpOptimWrapper, got {kind}')
    if cuda:
        optim_wrapper['type'] = 'AmpOptimWrapper'
        optim_wrapper.setdefault('loss_scale', 'dynamic')
        return optim_wrapper
    dtype = optim_wrapper.pop('dtype', None)
    if dtype not in (None, 'bfloat16'):
        raise ConfigError(f'mixed precision on the CPU runs in bfloat16; optim_wrapper.dtype='
                          f'{dtype} needs a GPU')
    optim_wrapper.pop('loss_scale', None)
    optim_wrapper.pop('use_fsdp', None)
    optim_wrapper['type'] = 'CPUAutocastOptimWrapper'
    return optim_wrapper
