"""Fusion of a whole model: :func:`reparameterize` (one generic walker that fuses every
re-parameterizable block) and :func:`unfused_eval` (its un-fused reference)."""
import contextlib
import copy

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers.base import ReparamConv2d


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuse every re-parameterizable block of ``model`` for deployment.

    First every :class:`~mmorepa.layers.ReparamConv2d` (OREPA, Rep-1x1, deep stem, DBB), wherever
    it sits, becomes a plain ``nn.Conv2d`` under the same attribute name (:func:`fuse_convs_`).
    Then, walking top-down, the outermost module with a ``switch_to_deploy()`` (mmorepa's
    backbones, mmpretrain's ``RepVGG`` / ``MobileOne`` and their blocks) fuses itself. Fusion is
    idempotent: fusing a fused model changes nothing.

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
    fuse_convs_(model)
    _switch_outermost(model)
    return model


def _switch_outermost(module: nn.Module):
    if hasattr(module, 'switch_to_deploy'):
        module.switch_to_deploy()
        return
    for child in module.children():
        _switch_outermost(child)


def fuse_convs_(module: nn.Module, prefix: str = '', _outer=None) -> int:
    """Replace, in place, every re-parameterizable conv below ``module`` by its plain
    ``nn.Conv2d``; returns how many were replaced.

    A layer that stands in for a bias-free conv but fuses to one with a bias (DBB: its branch
    norms leave a bias) has the bias folded into the BatchNorm that takes its output
    (``BN(W x + b) == BN'(W x)`` with ``running_mean - b``; see :func:`norm_taking_bias`), so the
    fused module has the keys of the stock network. Where there is none, a ``ValueError`` names
    the layer.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ReparamConv2d):
            conv = child.to_conv2d()
            if conv.bias is not None and not child.expects_bias and child.bn is None:
                _fold_bias_into_norm(module, name, conv, f'{prefix}{name}', _outer)
            setattr(module, name, conv)
            count += 1
        else:
            count += fuse_convs_(child, f'{prefix}{name}.', (module, name))
    return count


def _next_child(parent: nn.Module, name: str):
    names = list(parent._modules)
    return parent._modules[names[names.index(name) + 1]] if name != names[-1] else None


def norm_taking_bias(parent: nn.Module, name: str, channels: int, outer=None):
    """The BatchNorm (with running statistics, ``channels`` wide) that the host applies to the
    output of its conv ``parent.<name>``, or ``None``: the module registered right after the conv
    (ResNet blocks, a conv-first mmcv ``ConvModule``, ``Sequential(conv, bn)``), or, for a conv in
    a ``ModuleList`` (Res2Net's ``convs[i]``), the same entry of the ``ModuleList`` registered right
    after that list (``bns[i]``); ``outer`` is ``(grandparent, name of parent in it)``."""
    def fits(norm):
        return (isinstance(norm, _BatchNorm) and norm.num_features == channels
                and norm.running_mean is not None)

    order = getattr(parent, 'order', None)  # mmcv's ConvModule: 'norm' may run before 'conv'
    norm_after = not isinstance(order, tuple) or (
        'norm' in order and order.index('norm') > order.index('conv'))
    following = _next_child(parent, name)
    if norm_after and fits(following):
        return following
    if outer is not None and isinstance(parent, nn.ModuleList) and name.isdigit():
        sibling = _next_child(*outer)
        if isinstance(sibling, nn.ModuleList) and len(sibling) == len(parent):
            norm = sibling[int(name)]
            if fits(norm):
                return norm
    return None


def _fold_bias_into_norm(parent: nn.Module, name: str, conv: nn.Conv2d, path: str, outer):
    norm = norm_taking_bias(parent, name, conv.out_channels, outer)
    if norm is None:
        raise ValueError(f'{path} fuses to a conv with a bias, but its host built it without one '
                         'and no BatchNorm with running statistics follows it to take the bias')
    with torch.no_grad():
        norm.running_mean.sub_(conv.bias.to(norm.running_mean.dtype))
    conv.bias = None


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
