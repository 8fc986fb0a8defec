"""Import checkpoints of the paper's official code into mmpretrain ``ImageClassifier`` +
:class:`~mmorepa.models.OREPAResNet` (GlobalAveragePooling neck, LinearClsHead).

The architecture (block type, blocks per stage, width, classes) is read from the checkpoint.
Facts of the official format used here (see ``shared/fixtures/official_orepa/README.md``):
the deep stem composes its three generators as a cross-correlation without flipping, which equals
stacking them with generators 1 and 2 flipped spatially; our :class:`OREPALargeConv` stacks them
exactly (Eq. 3), so those two generators are imported flipped (and the weights of the fixed
frequency prior take the sign the flip gives each prior filter).
"""
import re
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from .errors import CheckpointError
from .ops import branches as B
from .ops.algebra import avg_kernel, frequency_prior, identity_kernel

# The official keys of the OREPA block's leaves, from the branch registry (its fixed tensors:
# _check_fixed).
_OREPA_3X3 = {leaf.official: leaf.attr for b in B.OREPA_BRANCHES for leaf in b.leaves}
_OREPA_3X3['vector'] = 'scales'
# Rep-1x1 in the official code: its 1x1 has a key of its own, its pair the registry's.
_REP_1X1 = {'weight_or1x1_origin': B.ONE_BY_ONE.leaves[0].attr,
            **{leaf.official: leaf.attr for leaf in B.ONE_BY_ONE_1X1.leaves},
            'vector': 'scales'}
_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def infer_architecture(sd: Dict[str, torch.Tensor]) -> dict:
    """Block type, blocks per stage, stem width and classes of an official checkpoint."""
    if 'stage0.conv1.weight0.weight_orepa_origin' not in sd or 'linear.weight' not in sd:
        first = next(iter(sd), None)
        raise CheckpointError('not a checkpoint of the official OREPA-ResNet: no '
                              f'stage0.conv1.weight0 / linear entries (first key {first!r})')
    blocks = []
    for s in range(1, 5):
        idx = {int(m.group(1)) for k in sd for m in [re.match(rf'stage{s}\.(\d+)\.', k)] if m}
        if not idx:
            raise CheckpointError(f'official checkpoint has no stage{s} blocks')
        blocks.append(max(idx) + 1)
    bottleneck = any(re.match(r'stage1\.0\.conv3\.', k) for k in sd)
    stem = sd['stage0.conv1.weight0.weight_orepa_origin'].shape[0]
    first_conv = ('stage1.0.conv1.weight_or1x1_origin' if bottleneck
                  else 'stage1.0.conv1.weight_orepa_origin')
    base = sd[first_conv].shape[0]
    num_classes, feat = sd['linear.weight'].shape
    return dict(bottleneck=bottleneck, stage_blocks=tuple(blocks), stem_channels=stem,
                base_channels=base, num_classes=num_classes, feat_dim=feat)


def model_cfg(arch: dict) -> dict:
    """The mmpretrain ``ImageClassifier`` config that a converted checkpoint loads into."""
    depth = 50 if arch['bottleneck'] else 18
    return dict(
        type='ImageClassifier',
        backbone=dict(type='OREPAResNet', depth=depth, reparam='orepa',
                      stage_blocks=arch['stage_blocks'], base_channels=arch['base_channels'],
                      stem_channels=arch['stem_channels'], out_indices=(3, ), style='pytorch'),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=arch['num_classes'],
                  in_channels=arch['feat_dim'], loss=dict(type='CrossEntropyLoss')))


def _prior_flip_sign(prior: torch.Tensor) -> torch.Tensor:
    """Per filter, the sign s with ``flip(prior) == s * prior`` (a frequency filter is even or
    odd about its centre)."""
    flipped = prior.flip(-1, -2)
    sign = torch.where((flipped * prior).sum((1, 2)) >= 0, 1.0, -1.0).to(prior.dtype)
    if not torch.allclose(flipped, sign.reshape(-1, 1, 1) * prior, atol=1e-6):
        raise CheckpointError('frequency prior is not symmetric or antisymmetric under a flip')
    return sign


def _check_fixed(src: str, sd, out_channels: int, in_channels: int):
    """The fixed tensors of an official OREPA conv must be the ones our layer builds."""
    k = sd[f'{src}.weight_orepa_origin'].shape[-1]
    want = {
        'weight_orepa_avg_avg': avg_kernel(k),
        'id_tensor': identity_kernel(in_channels),
        'weight_orepa_prior': frequency_prior(out_channels, k),
    }
    for name, value in want.items():
        got = sd.get(f'{src}.{name}')
        if got is None:
            raise CheckpointError(f'missing key {src}.{name!r} in the official checkpoint')
        if got.shape != value.shape or not torch.allclose(got.float(), value, atol=1e-6):
            raise CheckpointError(f'{src}.{name} differs from the fixed tensor of supp Table 1')


def _orepa_3x3(sd, src, dst, out, flip=False):
    c_out, c_in = sd[f'{src}.weight_orepa_origin'].shape[:2]
    _check_fixed(src, sd, c_out, sd[f'{src}.weight_orepa_1x1_kxk_idconv1'].shape[0])
    freq = B.ONE_BY_ONE_FREQ.leaves[0].attr
    for a, b in _OREPA_3X3.items():
        value = sd[f'{src}.{a}'].clone()
        if flip and b != 'scales':  # every leaf flipped spatially (a 1x1 stays as it is)
            value = value.flip(-1, -2)
        if flip and b == freq:
            sign = _prior_flip_sign(sd[f'{src}.weight_orepa_prior'].double()).to(value.dtype)
            value = value * sign.reshape(-1, 1, 1, 1)
        out[f'{dst}.{b}'] = value


def _rep_1x1(sd, src, dst, out):
    for a, b in _REP_1X1.items():
        out[f'{dst}.{b}'] = sd[f'{src}.{a}'].clone()


def _bn(sd, src, dst, out):
    for n in _BN:
        out[f'{dst}.{n}'] = sd[f'{src}.{n}'].clone()


def convert_state_dict(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Official state dict -> (our ImageClassifier state dict, architecture). Every official key
    is used exactly once; a key that has no place raises :class:`CheckpointError` naming it."""
    arch = infer_architecture(sd)
    out = OrderedDict()
    used = set()
    try:
        for g in range(3):
            _orepa_3x3(sd, f'stage0.conv1.weight{g}', f'backbone.conv1.generators.{g}', out,
                       flip=g > 0)
            used.update(k for k in sd if k.startswith(f'stage0.conv1.weight{g}.'))
        _bn(sd, 'stage0.conv1.bn', 'backbone.bn1', out)
        convs = ('conv1', 'conv2', 'conv3') if arch['bottleneck'] else ('conv1', 'conv2')
        for s, n in enumerate(arch['stage_blocks'], 1):
            for b in range(n):
                src, dst = f'stage{s}.{b}', f'backbone.layer{s}.{b}'
                for i, conv in enumerate(convs, 1):
                    if f'{src}.{conv}.weight_orepa_origin' in sd:
                        _orepa_3x3(sd, f'{src}.{conv}', f'{dst}.conv{i}', out)
                    else:
                        _rep_1x1(sd, f'{src}.{conv}', f'{dst}.conv{i}', out)
                    _bn(sd, f'{src}.{conv}.bn', f'{dst}.bn{i}', out)
                if f'{src}.shortcut.conv.weight' in sd:
                    out[f'{dst}.downsample.0.weight'] = sd[f'{src}.shortcut.conv.weight'].clone()
                elif f'{src}.shortcut.weight_or1x1_origin' in sd:
                    _rep_1x1(sd, f'{src}.shortcut', f'{dst}.downsample.0', out)
                if any(k.startswith(f'{src}.shortcut.') for k in sd):
                    _bn(sd, f'{src}.shortcut.bn', f'{dst}.downsample.1', out)
                used.update(k for k in sd if k.startswith(f'{src}.'))
    except KeyError as e:
        raise CheckpointError(f'missing key {e.args[0]!r} in the official checkpoint') from None
    out['head.fc.weight'] = sd['linear.weight'].clone()
    out['head.fc.bias'] = sd['linear.bias'].clone()
    used.update(k for k in sd if k.startswith(('stage0.conv1.bn.', 'linear.')))
    unused = [k for k in sd if k not in used]
    if unused:
        raise CheckpointError(f'unexpected key {unused[0]!r} in the official checkpoint: it has '
                              'no place in OREPAResNet')
    return out, arch
