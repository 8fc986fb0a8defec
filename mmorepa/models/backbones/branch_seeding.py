"""Plain convs of a backbone that start from a re-parameterized layer's branches in a checkpoint.

A backbone with OREPA layers may hold convs that stay plain (mmcv's deformable convs, which take
no ``conv_cfg``; a network fused with ``deploy=True``). A checkpoint of the un-fused OREPA network
holds, under such a conv's name, the branches of the layer that stood there instead of a
``weight``. :func:`seed_plain_convs` (a ``load_state_dict`` pre-hook of the backbone) builds that
layer from the entries, in float64, and puts its fused kernel (``fused_kernel_and_bias()``) in
their place: the conv starts from exactly what the layer computed in eval mode. A fused bias (DBB,
or a layer with its own norm) goes to the conv's bias, else into the running mean of the
BatchNorm that takes the conv's output, as fusion folds it.

A backbone conv that the checkpoint leaves at its initialisation is named in a WARNING, one line
per conv, whatever loads it (mmengine's loaders, ``init_cfg=Pretrained``, ``load_from``, torch's
``load_state_dict``; the hook cannot tell a strict load, whose missing keys then raise).

The kernel is the squeezed one, not rounded to a ``fake_quant_bits`` grid: the entries do not say
whether the layer was trained with one.
"""
import itertools
import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor

from ...layers import (DiverseBranchBlock, OREPAConv1x1, OREPAConv2d, OREPALargeConv,
                       ReparamConv2d)
from ...fusion import norm_taking_bias
from ...layers.orepa import SCALINGS

NORMS = (None, dict(type='BN'))


def seed_plain_convs(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict,
                     missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook (``module.register_load_state_dict_pre_hook``): every plain
    conv below ``module`` whose ``weight`` the checkpoint lacks but which finds there the entries
    of a re-parameterized layer of its geometry gets that layer's fused kernel; every conv the
    checkpoint leaves at its initialisation is named in a WARNING line."""
    if not any(k.startswith(prefix) for k in state_dict):
        return  # the module is absent: mmengine's / torch's missing-key report
    lines = []
    for name, conv, host in _convs(module):
        path = f'{prefix}{name}'
        if isinstance(conv, ReparamConv2d):
            if not any(k.startswith(path + '.') for k in state_dict):
                lines.append(f'{path} ({type(conv).__name__}): not in the checkpoint; left at '
                             'its initialisation')
            continue
        if path + '.weight' in state_dict:
            continue
        why = _seed(module, conv, host, path, prefix, state_dict)
        if why is not None:
            lines.append(f'{path} ({type(conv).__name__}): {why}; left at its initialisation')
    for line in lines:
        print_log(line, logger='current', level=logging.WARNING)


def _convs(module: nn.Module, prefix: str = '', _outer=None) -> Iterator[Tuple[str, nn.Module,
                                                                               tuple]]:
    """``(name, conv, (parent, attribute, outer))`` for each conv below ``module``: the
    re-parameterizable layers and the conv ops with a ``weight`` (``nn.Conv2d``, deformable
    convs, ...), not entering either (a deformable conv's offset conv is part of it)."""
    for name, child in module.named_children():
        if isinstance(child, ReparamConv2d) or _is_conv_op(child):
            yield f'{prefix}{name}', child, (module, name, _outer)
        elif not isinstance(child._parameters.get('weight'), nn.Parameter):
            yield from _convs(child, f'{prefix}{name}.', (module, name))


def _is_conv_op(module: nn.Module) -> bool:
    return (isinstance(module._parameters.get('weight'), nn.Parameter)
            and hasattr(module, 'kernel_size') and not getattr(module, 'transposed', False))


def _seed(module, conv, host, path, prefix, state_dict) -> Optional[str]:
    """Put the fused kernel of the layer whose entries ``state_dict`` holds under ``path`` in
    place of those entries; ``None``, or why the conv is not seeded."""
    inner = tuple(f'{n}.' for n, _ in conv.named_children())
    keys = [k for k in state_dict if k.startswith(path + '.')
            and not k[len(path) + 1:].startswith(inner)]
    if not keys:
        return 'not in the checkpoint'
    entries = {k[len(path) + 1:]: state_dict[k] for k in keys}
    layer = matching_layer(conv, entries)
    if layer is None:
        names = ', '.join(sorted({k.split('.')[0] for k in entries}))
        return (f'the checkpoint holds {names} here: no re-parameterized layer of its geometry '
                f'{tuple(conv.weight.shape)} has these entries')
    with torch.no_grad():
        kernel, bias = layer.fused_kernel_and_bias()
    bias_key = _bias_key(module, conv, host, prefix, path, bias, state_dict)
    if bias is not None and bias_key is None:
        return (f'the checkpoint\'s {type(layer).__name__} fuses to a conv with a bias, which '
                'neither this conv nor a BatchNorm after it takes')
    for k in keys:
        del state_dict[k]
    state_dict[path + '.weight'] = kernel.to(conv.weight.dtype)
    if bias_key == path + '.bias':
        state_dict[bias_key] = bias.to(conv.bias.dtype)
    elif bias_key is not None:  # BN(W x + b) == BN'(W x) with running_mean - b
        mean = state_dict[bias_key]
        state_dict[bias_key] = (mean.double() - bias).to(mean.dtype)
    print_log(f'{path} ({type(conv).__name__}): seeded with the fused kernel of the '
              f'checkpoint\'s {type(layer).__name__}', logger='current', level=logging.INFO)
    return None


def _bias_key(module, conv, host, prefix, path, bias, state_dict) -> Optional[str]:
    """The entry that takes a fused ``bias``: the conv's own, or the running mean of the
    BatchNorm after it (``None`` if neither, or if there is no bias)."""
    if bias is None:
        return None
    if getattr(conv, 'bias', None) is not None:
        return path + '.bias'
    parent, name, outer = host
    norm = norm_taking_bias(parent, name, conv.weight.shape[0], outer)
    if norm is None:
        return None
    name = next(n for n, m in module.named_modules() if m is norm)
    key = f'{prefix}{name}.running_mean'
    return key if key in state_dict else None


def matching_layer(conv: nn.Module, entries: Dict[str, Tensor]) -> Optional[ReparamConv2d]:
    """The re-parameterized layer of ``conv``'s geometry whose state-dict entries have the keys
    and shapes of ``entries``, built in float64 and loaded from them; ``None`` if there is none."""
    shapes = _shapes(entries)
    for build in _candidates(conv, shapes):
        with torch.device('meta'):
            try:
                probe = build()
            except ValueError:
                continue
        if _shapes(probe.state_dict()) == shapes:
            layer = build().double()
            missing, unexpected = layer.load_state_dict(entries, strict=False)
            assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
            return layer.eval()
    return None


def _shapes(state: Dict[str, Tensor]) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}


def _candidates(conv: nn.Module, shapes: Dict[str, tuple]):
    """Constructors (no arguments) of the layers ``conv`` may have been in the checkpoint's
    network: its geometry, each layer class with the branches whose entries are there."""
    if conv.weight.dim() != 4 or conv.weight.shape[2] != conv.weight.shape[3]:
        return
    c_out, cin_g, kh, _ = conv.weight.shape
    groups = getattr(conv, 'groups', 1)
    geometry = (cin_g * groups, c_out, kh)
    bias = 'bias' in shapes
    if kh == 1:
        yield from _orepa_options(OREPAConv1x1, geometry, groups, shapes, bias)
        return
    yield lambda: DiverseBranchBlock(*geometry, groups=groups)
    yield from _orepa_options(OREPAConv2d, geometry, groups, shapes, bias)
    if kh >= 5:
        first = {k.split('.', 2)[2]: s for k, s in shapes.items() if k.startswith('generators.0.')}
        for gen in _options(OREPAConv2d, (geometry[0], c_out, 3), groups, first):
            for norm in NORMS:
                yield lambda gen=gen, norm=norm: OREPALargeConv(
                    *geometry, groups=groups, bias=bias, norm_cfg=norm, generator_cfg=gen)


def _orepa_options(cls, geometry, groups, shapes, bias):
    for options, norm in itertools.product(_options(cls, geometry, groups, shapes), NORMS):
        yield lambda o=options, n=norm: cls(*geometry, groups=groups, bias=bias, norm_cfg=n, **o)


def _options(cls, geometry, groups, shapes) -> List[dict]:
    """``cls``'s ``branches`` / ``scaling`` (/ ``dw_expansion``) options that may give entries
    of these ``shapes``: the branches whose entries are all there, each scaling (and each
    expansion factor the entries' sizes allow)."""
    c_in, c_out, k = geometry
    with torch.device('meta'):
        full = cls(8, 8, k)  # the layer's default: every branch it has
    expands = hasattr(full, 'dw_expansion')
    branches, ratios = [], set()
    for branch in full.branches:
        with torch.device('meta'):
            alone = cls(c_in, c_out, k, groups=groups, branches=(branch,), scaling='none',
                        **({'dw_expansion': 1} if expands else {}))
        own = alone.state_dict()
        if own and all(key in shapes for key in own):
            branches.append(branch)
            ratios |= {_numel(shapes[key]) // max(v.numel(), 1) for key, v in own.items()}
    if not branches:
        return []
    expansions = sorted(r for r in ratios if r >= 1) if expands else [None]
    return [dict(branches=tuple(branches), scaling=scaling,
                 **({} if m is None else {'dw_expansion': m}))
            for scaling, m in itertools.product(SCALINGS, expansions)]


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
