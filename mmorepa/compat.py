"""The oldest torch mmorepa runs on (``import mmorepa`` refuses an older one in one line), and
what differs between that torch and newer ones."""
import re

import torch

TORCH_MINIMUM = '2.4'  # torch.library.custom_op / register_fake, serialization.add_safe_globals


def _release(version: str) -> tuple:
    return tuple(int(n) for n in re.findall(r'\d+', version.split('+')[0])[:2])


def torch_older_than(version: str, running: str = torch.__version__) -> bool:
    """Whether the running torch's release (major, minor) is below ``version``'s."""
    return _release(running) < _release(version)


def check_torch(version: str = torch.__version__) -> None:
    """Raise ImportError (one line naming the minimum) for a torch older than TORCH_MINIMUM."""
    if torch_older_than(TORCH_MINIMUM, version):
        raise ImportError(f'mmorepa needs torch >= {TORCH_MINIMUM}, found torch {version}: '
                          f'pip install "torch>={TORCH_MINIMUM}"')


check_torch()


def register_load_state_dict_pre_hook(module: torch.nn.Module, hook) -> None:
    """``module.register_load_state_dict_pre_hook(hook)`` (torch >= 2.5); on older torch the same
    hook, ``hook(module, state_dict, prefix, ...)``, through the private registration."""
    if hasattr(module, 'register_load_state_dict_pre_hook'):
        module.register_load_state_dict_pre_hook(hook)
    else:
        module._register_load_state_dict_pre_hook(hook, with_module=True)
