"""One generic walker that fuses every re-parameterizable block of a model."""
import contextlib
import copy

import torch.nn as nn

from .layers.base import ReparamConv2d


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every re-parameterizable block of ``model`` for deployment.

    Walking top-down, the outermost module that knows how to fuse owns its whole subtree:
    a :class:`~mmorepa.layers.ReparamConv2d` (OREPA, Rep-1x1, deep stem, DBB) is replaced by a
    plain ``nn.Conv2d`` under the same attribute name; any other module with a
    ``switch_to_deploy()`` (RepVGG / OREPA-VGG blocks, mmorepa's backbones, and mmpretrain's RepVGG
    or MobileOne) fuses itself. Fusion is idempotent: fusing a fused model changes nothing.

    Args:
        model: any model (a backbone, a detector, a single layer).
        inplace: fuse ``model`` itself; by default a deep copy is fused and ``model`` is untouched.

    Returns:
        The fused model (a plain ``nn.Conv2d`` if ``model`` itself was a re-parameterizable conv).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, ReparamConv2d):
        return model.to_conv2d()
    if hasattr(model, 'switch_to_deploy'):
        model.switch_to_deploy()
    else:
        fuse_children(model)
    return model


def fuse_children(module: nn.Module):
    """Fuse, in place, every re-parameterizable module below ``module`` (not ``module`` itself)."""
    for name, child in module.named_children():
        if isinstance(child, ReparamConv2d):
            setattr(module, name, child.to_conv2d())
        elif hasattr(child, 'switch_to_deploy'):
            child.switch_to_deploy()
        else:
            fuse_children(child)


@contextlib.contextmanager
def unfused_eval(model: nn.Module):
    """Within this context, every re-parameterizable layer of ``model`` evaluates without its
    eval-mode shortcut (one conv with the cached, norm-folded kernel): it squeezes its branches,
    convolves and applies its own norm on the feature maps. A reference for checking fusion."""
    with contextlib.ExitStack() as stack:
        for m in model.modules():
            if isinstance(m, ReparamConv2d):
                stack.enter_context(m.unfolded())
        yield model
