"""The conv classes of the toolboxes that compute as a plain zero-padded ``nn.Conv2d``.

:func:`~.reparam_backbone.swap_convs_` puts a re-parameterizable layer in place of each of them:

- ``nn.Conv2d`` (zero padding): the layer itself. String padding is taken in the numbers it
  means (:func:`zero_padding`: ``'valid'`` is 0, ``'same'`` at stride 1 pads ``d (k - 1) / 2`` on
  each side where that is whole); such a layer fuses back into a conv with the string padding.
- mmcv's ``Conv2d`` wrapper (``mmcv.cnn.bricks.wrappers.Conv2d``, registered as ``'Conv'``;
  VAN, DaViT): ``nn.Conv2d`` plus an empty-input case; the layer, fused back into the wrapper.
- mmcv's ``Conv2dAdaptivePadding`` (TF-style 'same' padding; EfficientNet): the layer with
  ``padding=0`` after an explicit pad of the input, by the amounts the stock class computes from
  the input size; fused back into ``Conv2dAdaptivePadding``.

In each case the layer fuses (``to_conv2d()``, what :func:`mmorepa.reparameterize` calls) into an
instance of the stock conv class with the stock keys, so the fused network is the stock one.
The subclass of the layer class that does so is made once per (layer class, stock conv class);
its instances pickle as that pair and their state, so they load in a fresh process.
"""
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...layers.base import ReparamConv2d


def _mmcv_convs() -> Tuple[Optional[type], Optional[type]]:
    """mmcv's ``Conv2d`` wrapper and ``Conv2dAdaptivePadding`` (``None`` without mmcv)."""
    try:
        from mmcv.cnn.bricks.conv2d_adaptive_padding import Conv2dAdaptivePadding
        from mmcv.cnn.bricks.wrappers import Conv2d
    except ImportError:
        return None, None
    return Conv2d, Conv2dAdaptivePadding


def same_padding(size: Tuple[int, int], kernel_size, stride, dilation) -> Tuple[int, ...]:
    """The ``F.pad`` amounts (left, right, top, bottom) of TF 'same' padding for an input of
    spatial ``size``: the output has ``ceil(size / stride)`` rows and columns; the extra row or
    column, when the total is odd, goes at the bottom / right (as ``Conv2dAdaptivePadding``)."""
    pads = []
    for n, k, s, d in zip(size, kernel_size, stride, dilation):
        pads.append(max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0))
    (ph, pw) = pads
    return (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)


def zero_padding(conv: nn.Conv2d):
    """``conv``'s padding as the ``(rows, columns)`` of zeros on each side that it pads; a
    string padding it cannot be written as (``'same'`` where ``d (k - 1)`` is odd: one side gets
    more) is returned as it is."""
    if conv.padding == 'valid':
        return (0, 0)
    if conv.padding == 'same':
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if all(t % 2 == 0 for t in totals):
            return tuple(t // 2 for t in totals)
    return conv.padding


class _FusesIntoStockConv:
    """Mixin of a re-parameterizable layer that stands in for a conv of class
    ``stock_conv_class`` (an ``nn.Conv2d`` subclass with ``nn.Conv2d``'s signature), whose
    padding is ``stock_padding`` where that is set (a string: ``'same'``, ``'valid'``)."""

    layer_class: type = ReparamConv2d
    stock_conv_class: type = nn.Conv2d

    def to_conv2d(self) -> nn.Conv2d:
        plain = super().to_conv2d()
        conv = self.stock_conv_class(
            plain.in_channels, plain.out_channels, plain.kernel_size, plain.stride,
            getattr(self, 'stock_padding', plain.padding), plain.dilation, plain.groups,
            bias=plain.bias is not None)
        conv.to(device=plain.weight.device, dtype=plain.weight.dtype)
        conv.load_state_dict(plain.state_dict())
        return conv.train(self.training)

    def __reduce_ex__(self, protocol):
        return _new_layer, (self.layer_class, self.stock_conv_class), self.__getstate__()


class _AdaptivePadding(_FusesIntoStockConv):
    """Mixin: pads the input as ``Conv2dAdaptivePadding`` does, then the layer (``padding=0``)."""

    def forward(self, x: Tensor) -> Tensor:
        pad = same_padding(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        return super().forward(F.pad(x, pad) if any(pad) else x)


_LAYER_CLASSES: Dict[Tuple[type, type], type] = {}


def stock_conv_layer_class(layer_class: type, stock_conv_class: type) -> type:
    """The subclass of ``layer_class`` (a :class:`~mmorepa.layers.ReparamConv2d`) that stands in
    for a conv of class ``stock_conv_class`` and fuses into it (one per pair)."""
    key = (layer_class, stock_conv_class)
    if key not in _LAYER_CLASSES:
        _, adaptive = _mmcv_convs()
        mixin = _AdaptivePadding if stock_conv_class is adaptive else _FusesIntoStockConv
        _LAYER_CLASSES[key] = type(
            f'{layer_class.__name__}As{stock_conv_class.__name__}', (mixin, layer_class),
            dict(layer_class=layer_class, stock_conv_class=stock_conv_class, __module__=__name__,
                 __doc__=f':class:`{layer_class.__name__}` standing in for '
                 f'``{stock_conv_class.__module__}.{stock_conv_class.__name__}``.'))
    return _LAYER_CLASSES[key]


def _new_layer(layer_class: type, stock_conv_class: type):
    """An empty instance of :func:`stock_conv_layer_class` (unpickling: the state follows)."""
    cls = stock_conv_layer_class(layer_class, stock_conv_class)
    return cls.__new__(cls)


class PlainConvForm:
    """How a stock conv class computes as a plain conv: the ``padding`` its layer gets (given
    the conv) and whether the layer needs the stock class back when fused."""

    def __init__(self, padding: Callable[[nn.Conv2d], object], keeps_class: bool):
        self.padding = padding
        self.keeps_class = keeps_class

    def adopt(self, layer: nn.Module, conv: nn.Conv2d) -> nn.Module:
        """``layer`` (built for ``conv``'s geometry) made to stand in for ``conv``'s class and
        fuse into it with its string padding, if it has one."""
        string_padding = isinstance(conv.padding, str)
        if (self.keeps_class or string_padding) and isinstance(layer, ReparamConv2d):
            layer.__class__ = stock_conv_layer_class(type(layer), type(conv))
            if string_padding:
                layer.stock_padding = conv.padding
        return layer


@functools.lru_cache(maxsize=None)
def plain_conv_forms() -> Dict[type, PlainConvForm]:
    """The conv classes that compute as a plain zero-padded conv, by exact class."""
    forms = {nn.Conv2d: PlainConvForm(zero_padding, keeps_class=False)}
    wrapper, adaptive = _mmcv_convs()
    if wrapper is not None:
        forms[wrapper] = PlainConvForm(zero_padding, keeps_class=True)
        forms[adaptive] = PlainConvForm(lambda conv: 0, keeps_class=True)
    return forms


def plain_conv_form(module: nn.Module) -> Optional[PlainConvForm]:
    """The :class:`PlainConvForm` of ``module``'s exact class, or ``None`` (not such a conv)."""
    return plain_conv_forms().get(type(module))
