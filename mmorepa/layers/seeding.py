"""Starting a re-parameterizable layer from a plain conv's weights (a stock checkpoint, a fused
deploy checkpoint): :class:`SeedFromPlainConv`, mixed into :class:`~mmorepa.layers.ReparamConv2d`.

A plain conv's ``weight`` (and ``bias``) in place of the layer's own state-dict entries sets its
branches so that the squeezed kernel is that weight (the layer's ``seeded_state``): the layer then
computes what the plain conv computed. Works wherever ``_load_from_state_dict`` is used
(``load_state_dict``, mmengine's ``load_checkpoint``, ``init_cfg=Pretrained`` with or without
``prefix``, ``load_from``). A checkpoint of another re-parameterization does not load; the layer
and the entries that differ are named.
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .fake_quant import per_channel_fake_quant


class SeedFromPlainConv:
    """Mixin of :class:`~mmorepa.layers.ReparamConv2d`: loading a plain conv's weights."""

    def seeded_state(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Dict[str, Tensor],
                                                                             float]:
        """Values for some of this layer's state-dict entries (the others keep theirs) with which
        its squeezed kernel is ``weight`` (float64 ``(C_out, C_in // g, k, k)``) and its bias
        ``bias``; and the relative error of that kernel (0 where the inverse is exact). Layers
        that cannot start from a plain conv raise ``NotImplementedError``."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Seed from a plain conv's ``weight`` when the checkpoint holds that in place of this
        layer's own entries; otherwise check that it holds this layer's entries."""
        own = [k for k in self.state_dict() if k != 'bias']
        if (not self.deploy and self.bn is None and prefix + 'weight' in state_dict
                and not any(prefix + k in state_dict for k in own)):
            self._seed_from_plain(state_dict, prefix, error_msgs)
        else:
            self._check_own_entries(state_dict, prefix, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_own_entries(self, state_dict, prefix, error_msgs):
        """A checkpoint of another re-parameterization (other OREPA branches, DBB, Rep-1x1 vs a
        plain 1x1, a fused layer ...) holds some of this layer's entries and others of its own:
        it does not load. Name the layer and the entries that differ (``error_msgs``: mmengine
        reports them with its key warnings, ``load_state_dict`` raises). Entries of inner
        re-parameterizable layers (the deep stem's generators) are checked by those layers."""
        inner = tuple(f'{n}.' for n, m in self.named_modules()
                      if n and isinstance(m, SeedFromPlainConv))
        given = {k[len(prefix):] for k in state_dict
                 if k.startswith(prefix) and not k[len(prefix):].startswith(inner)}
        if not given:
            return  # the layer is absent: the usual missing-key report
        expected = {k for k in self.state_dict() if not k.startswith(inner)}

        def names(keys):  # 'branch_kxk.bn.weight' -> 'branch_kxk'
            return ', '.join(sorted({k.split('.')[0] for k in keys})) or 'nothing'

        extra = given - expected
        missing = {k for k in expected - given if not k.endswith('num_batches_tracked')}
        if extra or missing:
            error_msgs.append(
                f'{prefix[:-1] or "layer"} ({type(self).__name__}): the checkpoint\'s entries '
                'are those of another re-parameterization (other branches, DBB, a fused or '
                f'plain layer): it has {names(extra)} that this layer lacks, and lacks '
                f'{names(missing)}; this layer is not loaded from it')

    def _plain_weights(self, state_dict, prefix, error_msgs, name):
        """The checkpoint's plain ``weight`` and ``bias`` in float64 on the layer's device, or
        ``None`` (the reason appended to ``error_msgs``)."""
        weight, bias = state_dict[prefix + 'weight'], state_dict.get(prefix + 'bias')
        k = self.kernel_size[0]
        shape = (self.out_channels, self.in_channels // self.groups, k, k)
        if tuple(weight.shape) != shape:
            error_msgs.append(f'size mismatch for {prefix}weight: a plain conv weight of shape '
                              f'{tuple(weight.shape)} cannot seed {name} {shape}')
            return None
        if bias is not None and self.bias is None:
            error_msgs.append(f'{prefix}bias: the checkpoint\'s conv has a bias, {name} has none')
            return None
        # the checkpoint may sit on another device than the model (mmengine loads it on the CPU)
        device = next(self.parameters()).device
        weight = weight.detach().to(device, torch.float64)
        bias = (torch.zeros(self.out_channels, dtype=torch.float64, device=device)
                if bias is None and self.bias is not None
                else None if bias is None else bias.detach().to(device, torch.float64))
        return weight, bias

    def _seed_from_plain(self, state_dict, prefix, error_msgs):
        from mmengine.logging import print_log
        name = f'{prefix[:-1] or "layer"} ({type(self).__name__})'
        plain = self._plain_weights(state_dict, prefix, error_msgs, name)
        if plain is None:
            return
        weight, bias = plain
        try:
            values, err = self.seeded_state(weight, bias)
        except NotImplementedError:
            return  # not seeded: the usual missing / unexpected key report follows
        except ValueError as e:
            error_msgs.append(f'{name} cannot start from the plain conv weight {prefix}weight: {e}')
            return
        del state_dict[prefix + 'weight']
        state_dict.pop(prefix + 'bias', None)
        for key, value in self.state_dict().items():
            state_dict[prefix + key] = values.get(key, value).detach().to(
                device=value.device, dtype=value.dtype).clone()
        what = 'squeezed kernel'
        if self.fake_quant_bits is not None:  # the layer's kernel is the seeded one rounded
            what = f'kernel (squeezed, rounded to {self.fake_quant_bits} bits)'
            err = max(err, float((per_channel_fake_quant(weight, self.fake_quant_bits) - weight)
                                 .norm() / weight.norm().clamp_min(1e-300)))
        exact = err <= 1e-6
        k = self.kernel_size[0]
        print_log(f'{name}: seeded from a plain {k}x{k} conv weight, {what} '
                  f'{"exact" if exact else "NOT exact"} (relative error {err:.1e} in float64)',
                  logger='current', level=logging.INFO if exact else logging.WARNING)


def absorbed_state(layer, branch: str, weight: Tensor, bias: Optional[Tensor]):
    """``layer.seeded_state`` for a layer of scaled branches whose ``branch`` has one full-size
    kernel (kxk, or the 1x1 of Rep-1x1): it absorbs the difference between ``weight`` and the
    squeezed kernel, the other branches keep their own (diverse) values (Sec. 3.4, Prop. 1
    Condition 2). Exact."""
    if branch not in layer.branches:
        raise ValueError(f'{type(layer).__name__} without a {branch!r} branch (branches '
                         f'{layer.branches}) cannot start from a plain conv weight')
    row = layer.branches.index(branch)
    scale = torch.ones(()) if layer.scales is None else layer.scales[row].detach().double()
    if bool((scale.abs() < 1e-12).any()):
        raise ValueError(f'the {branch!r} branch of {type(layer).__name__} has a zero scale: '
                         'it cannot absorb a plain conv weight')
    (attr, ) = layer.branch_records[row].attrs()
    with torch.no_grad():
        current = layer.squeezed_kernel_and_bias()[0].double()
        own = getattr(layer, attr).double()
        values = {attr: own + (weight - current) / scale.reshape(-1, 1, 1, 1)}
    if bias is not None:
        values['bias'] = bias
    return values, 0.0
