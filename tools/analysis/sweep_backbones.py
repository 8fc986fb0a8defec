"""Every ``OREPA<Name>`` of the installed toolboxes, built small and checked end to end.

    python tools/analysis/sweep_backbones.py [--toolboxes mmpretrain mmdet mmseg]
        [--names NAME ...] [--markdown OUT.md]

For each backbone a toolbox exports (``models/backbones/__init__.py``'s ``__all__``), at a small
width (the smallest arch each class takes; a reduced one for the widest families): build
``OREPA<Name>``, one SGD step in train mode, fuse (:func:`mmorepa.reparameterize`), build the
deploy config :func:`mmorepa.deploy.deploy_config` writes (the stock class) and load the fused
weights into it strictly, and compare its features with the un-fused model's in float64, whose
layers squeeze their branches, convolve and normalize on feature maps (``unfused_eval``). One
table row per name: the re-parameterized layers, the k x k convs kept plain and why, the
relative error. Exit status 1 if a row fails.
"""
import contextlib
import copy
import logging
import math
import os.path as osp
import sys
import time
from typing import Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import mmorepa  # noqa: E402
from mmorepa.deploy import deploy_config, features  # noqa: E402
from mmorepa.layers import ReparamConv2d  # noqa: E402
from mmorepa.models.backbones.any_backbone import toolbox_backbone_names  # noqa: E402
from mmorepa.models.backbones.reparam_backbone import toolbox_registry  # noqa: E402

TOOLBOXES = ('mmpretrain', 'mmdet', 'mmseg')
TOLERANCE = 1e-5
BN = dict(type='BN')


def _hrnet_extra(block='BASIC'):
    def stage(n, branches, blk):
        return dict(num_modules=1, num_branches=branches, block=blk, num_blocks=(1, ) * branches,
                    num_channels=tuple(4 * 2 ** i for i in range(branches)) if branches > 1
                    else (8, ))
    return dict(stage1=stage(1, 1, 'BOTTLENECK'), stage2=stage(2, 2, block),
                stage3=stage(3, 3, block), stage4=stage(4, 4, block))


RESNET = dict(depth=18, base_channels=8, stem_channels=8)
RESNET50 = dict(depth=50, base_channels=8, stem_channels=8)
VIT = dict(arch=dict(embed_dims=16, num_layers=1, num_heads=2, feedforward_channels=16),
           img_size=32, patch_size=16)
SWIN = dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)), img_size=64,
            window_size=2)
MMSEG_SWIN = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=2,
                  pretrain_img_size=64)

# (arguments, input side) per name; a toolbox-specific entry ('mmdet:EfficientNet') first
CASES: Dict[str, tuple] = {
    'LeNet5': (dict(num_classes=-1), 32),
    'AlexNet': (dict(num_classes=-1), 64),
    'RegNet': (dict(arch=dict(w0=8, wa=12.0, wm=1.5, group_w=8, depth=4, bot_mul=1.0)), 32),
    'ResNet': (RESNET, 32),
    'ResNeXt': (dict(RESNET50, groups=2, width_per_group=4), 32),
    'mmdet:ResNeXt': (dict(RESNET50, groups=2, base_width=4), 32),
    'mmseg:ResNeXt': (dict(RESNET50, groups=2, base_width=4), 32),
    'ResNetV1c': (RESNET, 32),
    'ResNetV1d': (RESNET, 32),
    'ResNeSt': (dict(RESNET50, radix=2), 64),
    'ResNet_CIFAR': (RESNET, 32),
    'SEResNet': (RESNET50, 32),
    'SEResNeXt': (dict(RESNET50, groups=2, width_per_group=4), 32),
    'Res2Net': (dict(RESNET50, scales=2, base_width=8), 32),
    'SparseResNet': (RESNET, 32),
    'DetectoRS_ResNet': (dict(RESNET50), 32),
    'DetectoRS_ResNeXt': (dict(RESNET50, groups=2, base_width=4), 32),
    'TridentResNet': (dict(depth=50, base_channels=8, stem_channels=8, num_branch=3,
                           test_branch_idx=-1, trident_dilations=(1, 2, 3), num_stages=3,
                           strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2, )), 32),
    'ShuffleNetV1': (dict(groups=1, widen_factor=0.25), 32),
    'ShuffleNetV2': (dict(widen_factor=0.5), 32),
    'MobileNetV2': (dict(widen_factor=0.25), 32),
    'MobileNetV3': (dict(arch='small'), 32),
    'VisionTransformer': (VIT, 32),
    'DistilledVisionTransformer': (VIT, 32),
    'DeiT3': (VIT, 32),
    'BEiTViT': (VIT, 32),
    'RevVisionTransformer': (VIT, 32),
    'ViTEVA02': (dict(arch=dict(embed_dims=16, num_layers=1, num_heads=2,
                                feedforward_channels=16), img_size=32, patch_size=16), 32),
    'ViTSAM': (dict(arch=dict(embed_dims=16, num_layers=1, num_heads=2, feedforward_channels=16,
                              global_attn_indexes=(0, )), img_size=32, patch_size=16,
                    out_channels=8), 32),
    'SwinTransformer': (SWIN, 64),
    'mmdet:SwinTransformer': (MMSEG_SWIN, 64),
    'mmseg:SwinTransformer': (MMSEG_SWIN, 64),
    'SwinTransformerV2': (dict(arch=dict(embed_dims=16, depths=(1, 1, 1, 1),
                                         num_heads=(1, 1, 1, 1), extra_norm_every_n_blocks=0),
                               img_size=64, window_size=2), 64),
    'TNT': (dict(arch=dict(embed_dims_outer=16, embed_dims_inner=4, num_layers=1,
                           num_heads_outer=2, num_heads_inner=1), img_size=32), 32),
    'T2T_ViT': (dict(img_size=64, embed_dims=16, num_layers=1,
                     t2t_cfg=dict(token_dims=8, use_performer=False),
                     layer_cfgs=dict(num_heads=2, feedforward_channels=16)), 64),
    'Conformer': (dict(arch=dict(embed_dims=16, depths=3, num_heads=2, channel_ratio=1),
                       base_channels=8), 64),
    'MlpMixer': (dict(arch=dict(embed_dims=16, num_layers=1, tokens_mlp_dims=8,
                                channels_mlp_dims=16), img_size=32, patch_size=16), 32),
    'PCPVT': (dict(arch=dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                             num_heads=[1, 1, 1, 1], patch_sizes=[4, 2, 2, 2],
                             strides=[4, 2, 2, 2], mlp_ratios=[2, 2, 2, 2],
                             sr_ratios=[2, 1, 1, 1])), 32),
    'SVT': (dict(arch=dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                           num_heads=[1, 1, 1, 1], patch_sizes=[4, 2, 2, 2],
                           strides=[4, 2, 2, 2], mlp_ratios=[2, 2, 2, 2], sr_ratios=[2, 1, 1, 1],
                           window_sizes=[2, 2, 2, 2])), 32),
    'mmseg:PCPVT': (dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                         num_heads=[1, 1, 1, 1], patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2],
                         mlp_ratios=[2, 2, 2, 2], sr_ratios=[2, 1, 1, 1]), 32),
    'mmseg:SVT': (dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                       patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2],
                       mlp_ratios=[2, 2, 2, 2], sr_ratios=[2, 1, 1, 1],
                       windiow_sizes=[2, 2, 2, 2]), 32),
    'EfficientNet': (dict(arch='b0', out_indices=(6, )), 32),
    'mmdet:EfficientNet': (dict(arch='b0', out_indices=(6, )), 32),
    'EfficientNetV2': (dict(arch='b0', out_indices=(7, )), 32),
    'ConvNeXt': (dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 16, 16])), 32),
    'SparseConvNeXt': (dict(arch=dict(depths=[1, 1, 1, 1], channels=[8, 16, 16, 16])), 32),
    'HRNet': (dict(extra=_hrnet_extra()), 32),
    'mmpretrain:HRNet': (dict(arch='w18', extra=None), 32),
    'ConvMixer': (dict(arch=dict(embed_dims=16, depth=1, patch_size=4, kernel_size=9)), 32),
    'EdgeNeXt': (dict(arch=dict(channels=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                num_heads=[2, 2, 2, 2])), 64),
    'CSPDarkNet': (dict(depth='sweep', out_indices=(2, )), 32),
    'CSPResNet': (dict(depth='sweep', out_indices=(1, )), 32),
    'CSPResNeXt': (dict(depth='sweep', out_indices=(1, )), 32),
    'RepVGG': (dict(arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.125] * 4,
                              group_layer_map=None, se_cfg=None)), 32),
    'RepLKNet': (dict(arch=dict(large_kernel_sizes=[7, 7, 5, 5], layers=[1, 1, 1, 1],
                                channels=[8, 16, 16, 16], small_kernel=3, dw_ratio=1)), 64),
    'RepMLPNet': (dict(arch=dict(channels=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                 sharesets_nums=[1, 2, 2, 2]), img_size=32,
                       reparam_conv_kernels=(1, 3)), 32),
    'PoolFormer': (dict(arch=dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16],
                                  mlp_ratios=[2, 2, 2, 2], layer_scale_init_value=1e-5),
                    out_indices=(0, 2, 4, 6)), 32),
    'RIFormer': (dict(arch=dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16],
                                mlp_ratios=[2, 2, 2, 2], layer_scale_init_value=1e-5),
                  out_indices=(0, 2, 4, 6)), 32),
    'DenseNet': (dict(arch=dict(growth_rate=4, depths=[1, 1, 1, 1], init_channels=8)), 32),
    'VAN': (dict(arch=dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                           ffn_ratios=[2, 2, 2, 2])), 32),
    'InceptionV3': (dict(), 75),
    'MobileOne': (dict(arch=dict(num_blocks=[1, 1, 1, 1], width_factor=[0.25] * 4,
                                 num_conv_branches=[1, 1, 1, 1], num_se_blocks=[0, 0, 0, 0])),
                  32),
    'EfficientFormer': (dict(arch=dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 16, 16],
                                       downsamples=[False, True, True, True], vit_num=0),
                         reshape_last_feat=True), 32),
    'MViT': (dict(arch=dict(embed_dims=16, num_layers=2, num_heads=1, downscale_indices=[1]),
                  img_size=32), 32),
    'HorNet': (dict(arch=dict(base_dim=8, depths=[1, 1, 1, 1], orders=[2, 3, 4, 5],
                              dw_cfg=[dict(type='DW', kernel_size=7)] * 4)), 32),
    'MobileViT': (dict(arch=[['mobilenetv2', 8, 1, 1, 2], ['mobilenetv2', 8, 2, 1, 2],
                             ['mobilevit', 16, 2, 16, 1, 2], ['mobilevit', 16, 2, 16, 1, 2],
                             ['mobilevit', 16, 2, 16, 1, 2]], stem_channels=8,
                       last_exp_factor=1), 64),
    'DaViT': (dict(arch=dict(embed_dims=8, depths=[1, 1, 1, 1],
                             num_heads=[1, 1, 1, 1]), window_size=2), 64),
    'MixMIMTransformer': (dict(arch=dict(embed_dims=16, depths=[1, 1, 1, 1],
                                         num_heads=[1, 1, 1, 1]), img_size=64,
                               window_size=[2, 2, 2, 1]), 64),
    'TinyViT': (dict(arch=dict(channels=[8, 16, 16, 16], num_heads=[1, 1, 1, 1],
                               depths=[1, 1, 1, 1]), img_size=(64, 64), window_size=[2, 2, 2, 2],
                     out_indices=(3, )), 64),
    'LeViT': (dict(arch='sweep', img_size=64, out_indices=(2, )), 64),
    'Vig': (dict(arch='sweep', k=3), 224),
    'PyramidVig': (dict(arch='sweep', k=3), 224),
    'XCiT': (dict(img_size=32, patch_size=8, embed_dims=16, depth=1, cls_attn_layers=1,
                  num_heads=2), 32),
    # HiViT's forward also takes out_indices as indices of its 6 stem blocks: 7 main blocks
    'HiViT': (dict(arch=dict(embed_dims=16, depths=[1, 1, 7], num_heads=2), img_size=32), 32),
    'SSDVGG': (dict(depth=11, out_indices=(3, 4), out_feature_indices=(12, 18)), 300),
    'HourglassNet': (dict(downsample_times=2, num_stacks=1, stage_channels=(8, 8, 8),
                          stage_blocks=(1, 1, 1), feat_channel=8), 64),
    'Darknet': (dict(depth='sweep', out_indices=(5, )), 32),
    'CSPDarknet': (dict(deepen_factor=0.33, widen_factor=0.125), 64),
    'CSPNeXt': (dict(deepen_factor=0.33, widen_factor=0.125), 64),
    'PyramidVisionTransformer': (dict(embed_dims=8, num_layers=[1, 1, 1, 1],
                                      num_heads=[1, 1, 1, 1]), 64),
    'PyramidVisionTransformerV2': (dict(embed_dims=8, num_layers=[1, 1, 1, 1],
                                        num_heads=[1, 1, 1, 1]), 64),
    'FastSCNN': (dict(downsample_dw_channels=(8, 8), global_in_channels=8,
                      global_block_channels=(8, 8, 8), higher_in_channels=8,
                      lower_in_channels=8, fusion_out_channels=8, global_out_channels=8), 64),
    'UNet': (dict(base_channels=8, num_stages=3, strides=(1, 1, 1), enc_num_convs=(1, 1, 1),
                  dec_num_convs=(1, 1), downsamples=(True, True), enc_dilations=(1, 1, 1),
                  dec_dilations=(1, 1)), 32),
    'CGNet': (dict(num_channels=(8, 16, 16), num_blocks=(1, 1)), 32),
    'mmseg:MobileNetV3': (dict(arch='small', out_indices=(12, )), 32),
    'mmseg:VisionTransformer': (dict(img_size=32, patch_size=16, embed_dims=16, num_layers=1,
                                     num_heads=2, mlp_ratio=1, out_indices=(0, )), 32),
    'MixVisionTransformer': (dict(embed_dims=8, num_layers=[1, 1, 1, 1], num_heads=[1, 1, 1, 1]),
                             64),
    'BiSeNetV1': (dict(backbone_cfg=dict(type='ResNet', depth=18, base_channels=8,
                                         stem_channels=8), spatial_channels=(8, 8, 8, 16),
                       context_channels=(16, 32, 64), out_channels=16, out_indices=(0, 1)),
                  64),
    'BiSeNetV2': (dict(detail_channels=(8, 8, 16), semantic_channels=(8, 8, 16, 16),
                       semantic_expansion_ratio=2, bga_channels=16, out_indices=(0, 1)), 64),
    'ICNet': (dict(backbone_cfg=dict(type='ResNetV1c', depth=18, base_channels=8,
                                     stem_channels=8, dilations=(1, 1, 2, 4),
                                     strides=(1, 2, 1, 1)),
                   layer_channels=(16, 64), light_branch_middle_channels=8,
                   psp_out_channels=16, out_channels=(8, 8, 16)), 64),
    'ERFNet': (dict(enc_downsample_channels=(4, 8, 16), enc_stage_non_bottlenecks=(1, 1),
                    enc_non_bottleneck_dilations=(2, ), enc_non_bottleneck_channels=(8, 16),
                    dec_upsample_channels=(8, 4), dec_stages_non_bottleneck=(1, 1),
                    dec_non_bottleneck_channels=(8, 4)), 32),
    'STDCNet': (dict(stdc_type='STDCNet1', in_channels=3, channels=(8, 16, 32, 32, 32),
                     bottleneck_type='cat', num_convs=4, norm_cfg=BN, act_cfg=dict(type='ReLU')),
                64),
    'STDCContextPathNet': (dict(backbone_cfg=dict(
        type='STDCNet', stdc_type='STDCNet1', in_channels=3, channels=(8, 16, 32, 32, 32),
        bottleneck_type='cat', num_convs=4, norm_cfg=BN, act_cfg=dict(type='ReLU')),
        last_in_channels=(32, 32), out_channels=16,
        ffm_cfg=dict(in_channels=48, out_channels=16, scale_factor=4)), 64),
    'BEiT': (dict(img_size=32, patch_size=16, embed_dims=16, num_layers=1, num_heads=2,
                  mlp_ratio=1, out_indices=(0, )), 32),
    'MAE': (dict(img_size=32, patch_size=16, embed_dims=16, num_layers=1, num_heads=2,
                 mlp_ratio=1, out_indices=(0, )), 32),
    'PIDNet': (dict(channels=8, ppm_channels=16, num_stem_blocks=1, num_branch_blocks=1), 64),
    'MSCAN': (dict(embed_dims=[8, 16, 16, 16], depths=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
                   norm_cfg=BN), 32),
    'DDRNet': (dict(channels=8, ppm_channels=16), 64),
}
# conv ops whose weight the stock class leaves as uninitialized memory (mmdet's TridentConv:
# ``torch.Tensor(...)``, which no ``init_weights`` reaches; mmdet's configs load a checkpoint
# into it): the sweep draws it (He normal)
UNINITIALIZED = ('TridentConv', )
NEEDS = {'TIMMBackbone': 'the timm package', 'VPD': 'diffusers and a class-embedding file',
         'SparseResNet': 'the sparse masks of a SparK pre-training step',
         'SparseConvNeXt': 'the sparse masks of a SparK pre-training step'}
# Reduced archs (the widest families, and classes that take only a named arch): an entry
# 'sweep' added to the class's own table while the sweep builds it (table attribute, the entry
# whose other keys it keeps or None, the entry).
SWEEP_ARCHS = {
    'CSPDarkNet': ('arch_settings', 53, dict(
        in_channels=(8, 8, 16), out_channels=(8, 16, 16), num_blocks=(1, 1, 1),
        expand_ratio=(2, 1, 1), bottle_ratio=(2, 1, 1), has_downsampler=True,
        down_growth=True)),
    'CSPResNet': ('arch_settings', 50, dict(
        in_channels=(8, 16), out_channels=(16, 16), num_blocks=(1, 1), expand_ratio=4,
        bottle_ratio=2, has_downsampler=(False, True), down_growth=False)),
    # the downsampling conv has 32 groups; the blocks' own groups and widths are reduced
    'CSPResNeXt': ('arch_settings', 50, dict(
        in_channels=(32, 64), out_channels=(64, 64), num_blocks=(1, 1), expand_ratio=(4, 2),
        bottle_ratio=4, has_downsampler=(False, True), down_growth=False,
        block_args=dict(base_channels=8, groups=2, width_per_group=4))),
    'Darknet': ('arch_settings', None, ((1, 1, 1, 1, 1), ((32, 16), (16, 16), (16, 16),
                                                     (16, 16), (16, 16)))),
    'LeViT': ('arch_zoo', None, dict(embed_dims=[16, 16, 16], num_heads=[1, 1, 1], depths=[1, 1, 1],
                               key_dims=[8, 8, 8])),
    'Vig': ('arch_settings', None, dict(num_blocks=1, channels=16)),
    'PyramidVig': ('arch_settings', None, dict(blocks=[1, 1, 1, 1], channels=[8, 16, 16, 16])),
}


def case_of(toolbox: str, name: str):
    """``(arguments, input side)`` of ``name`` in ``toolbox``, or ``None`` when it has none."""
    return CASES.get(f'{toolbox}:{name}') or CASES.get(name)


@contextlib.contextmanager
def sweep_arch(stock: type, name: str):
    """Within this context ``stock``'s arch table has the entry ``'sweep'`` (``SWEEP_ARCHS``)."""
    if name not in SWEEP_ARCHS:
        yield
        return
    attr, base, entry = SWEEP_ARCHS[name]
    table = getattr(stock, attr)
    table['sweep'] = entry if base is None else dict(table[base], **entry)
    try:
        yield
    finally:
        del table['sweep']


def _outputs(model, x) -> torch.Tensor:
    """A backbone's outputs, flattened into one vector (a backbone has no ``extract_feat``)."""
    return features(model, x)


def _randomize_norms_(model: nn.Module, generator: torch.Generator):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * .1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + .5)


def _randomize_uninitialized_(model: nn.Module, generator: torch.Generator):
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in UNINITIALIZED:
                std = (2 / m.weight[0].numel()) ** .5
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)


def _train_step(model: nn.Module, x: torch.Tensor):
    """One SGD step in train mode, the gradient clipped to norm 1. The norms keep their (random)
    running statistics: at these sizes the last maps are 1x1 or 2x2, whose batch statistics
    would make eval mode blow up."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        _outputs(model, x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # batch norms of 1x1 maps: huge gradients
        torch.optim.SGD(params, lr=1e-2).step()
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    model.eval()


def _unfused_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The un-fused model's features in float64 (not the fused arithmetic), or in the model's
    own dtype for networks that make float32 tensors of their own (positional encodings); the
    table names such a reference."""
    with torch.no_grad(), mmorepa.unfused_eval(model):
        return _float64_or_own_outputs(model, x)


def _float64_or_own_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The features of a float64 copy of ``model``, or of ``model`` in its own dtype where it
    makes float32 tensors of its own."""
    try:
        return _outputs(copy.deepcopy(model).double(), x.double())
    except RuntimeError:
        return _outputs(model, x)


def _stock_features(stock: nn.Module, x: torch.Tensor, dtype) -> torch.Tensor:
    """The stock model's features in float64 when the reference is (so the comparison tests the
    fusion's arithmetic, not float32 rounding, which flips near-ties of a k-nearest-neighbour
    graph such as Vig's with the thread count), else in its own dtype."""
    with torch.no_grad():
        if dtype == torch.float64:
            return _float64_or_own_outputs(stock, x).double()
        return _outputs(stock, x).double()


def _load_strictly(stock: nn.Module, state_dict: dict):
    """``load_state_dict(strict=True)``, except for the keys the stock class itself drops when it
    loads its own state dict (SwinTransformerV2 re-creates its relative-position buffers)."""
    own = stock.load_state_dict(copy.deepcopy(stock.state_dict()), strict=False)
    result = stock.load_state_dict(state_dict, strict=False)
    missing = set(result.missing_keys) - set(own.missing_keys)
    unexpected = set(result.unexpected_keys) - set(own.unexpected_keys)
    if missing or unexpected:
        raise AssertionError(f'the fused weights do not fit the stock class: missing '
                             f'{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}')


def _outer_layers(model: nn.Module) -> List[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, ReparamConv2d)]
    return [n for n in names if not any(n.startswith(o + '.') for o in names)]


def check_backbone(toolbox: str, name: str) -> dict:
    """Build ``OREPA<name>`` of ``toolbox`` small, train a step, fuse, load into the deploy
    config's stock model; the row of the table (``error`` set when a check fails)."""
    row = dict(toolbox=toolbox, name=name, layers=0, kept=[], rel_err=None, error=None)
    case = case_of(toolbox, name)
    if name in NEEDS:
        row['skip'] = f'not built here: needs {NEEDS[name]}'
        return row
    init_default_scope(toolbox)
    registry = toolbox_registry(toolbox)
    registry.import_from_location()
    if name not in registry.module_dict:
        row['skip'] = (f'{toolbox} exports {name} without registering it: neither {name} nor '
                       f'OREPA{name} builds')
        return row
    if case is None:
        row['error'] = 'no small configuration in this sweep'
        return row
    kwargs, side = case
    torch.manual_seed(0)
    cfg = dict(type=f'OREPA{name}', **copy.deepcopy(kwargs))
    in_channels = 1 if name == 'LeNet5' else 3
    x = torch.randn(2, in_channels, side, side)
    with sweep_arch(registry.module_dict[name], name):
        _check(registry, name, cfg, x, row)
    return row


def _check(registry, name, cfg, x, row):
    toolbox = registry.scope
    try:
        model = registry.build(cfg)
        row['layers'] = len(_outer_layers(model))
        row['kept'] = list(getattr(model, 'convs_kept_plain', ()))
        _randomize_uninitialized_(model, torch.Generator().manual_seed(2))
        _randomize_norms_(model, torch.Generator().manual_seed(1))
        _train_step(model, x)
        reference = _unfused_features(model, x)
        row['reference'] = str(reference.dtype).replace('torch.', '')
        precision, reference = reference.dtype, reference.double()
        if not (torch.isfinite(reference).all() and reference.abs().max() > 0):
            raise AssertionError('the un-fused features are zero or not finite after the '
                                 'training step')
        fused = mmorepa.reparameterize(model)
        deployed = deploy_config(Config(dict(default_scope=toolbox, model=cfg))).model
        stock = registry.build(deployed)
        if type(stock) is not registry.get(name):
            raise AssertionError(f'deploy config builds {type(stock).__name__}, not {name}')
        _load_strictly(stock, fused.state_dict())
        stock.eval()
        out = _stock_features(stock, x, precision)
        row['rel_err'] = ((out - reference).norm() / reference.norm().clamp_min(1e-300)).item()
        if not math.isfinite(row['rel_err']) or row['rel_err'] > TOLERANCE:
            row['error'] = f'fused differs from un-fused: {row["rel_err"]:.1e}'
    except Exception as e:  # noqa: BLE001 - one row per name, whatever fails
        first = (str(e).strip().splitlines() or [''])[0][:160]
        row['error'] = f'{type(e).__name__}: {first}'


def _why(kept: List[str]) -> str:
    """``'name (why)'`` entries grouped by reason: ``'3 x why'``."""
    counts: Dict[str, int] = {}
    for entry in kept:
        why = entry[entry.index('(') + 1:-1] if '(' in entry else entry
        counts[why] = counts.get(why, 0) + 1
    return '; '.join(f'{n} x {why}' for why, n in counts.items())


HEADER = ('| toolbox | OREPA name | re-parameterized layers | k x k convs kept plain (why) '
          '| fused vs un-fused | result |\n|---|---|---|---|---|---|')


def table_row(r: dict) -> str:
    err = '' if r['rel_err'] is None else f'{r["rel_err"]:.1e}'
    if err and r.get('reference', 'float64') != 'float64':
        err += f' ({r["reference"]} reference)'
    result = r.get('skip') or r['error'] or 'ok'
    return (f'| {r["toolbox"]} | OREPA{r["name"]} | {r["layers"]} | '
            f'{_why(r["kept"]) or "none"} | {err} | {result} |')


def table(rows: List[dict]) -> str:
    return '\n'.join([HEADER] + [table_row(r) for r in rows])


def sweep(toolboxes=TOOLBOXES, names: Optional[List[str]] = None, on_row=None) -> List[dict]:
    """The rows of every exported backbone of ``toolboxes`` (``names``: only these);
    ``on_row(row)`` is called as each one is done."""
    rows = []
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for toolbox in toolboxes:
            for name in toolbox_backbone_names(toolbox):
                if name == 'VGG' or (names and name not in names):
                    continue
                start = time.perf_counter()
                rows.append(check_backbone(toolbox, name))
                rows[-1]['seconds'] = time.perf_counter() - start
                if on_row is not None:
                    on_row(rows[-1])
    finally:
        logger.setLevel(level)
    return rows


def main(argv=None):
    from mmorepa.cli import ArgumentParser, ToolError
    from mmorepa.fileio import atomic_write
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--toolboxes', nargs='+', default=list(TOOLBOXES),
                        choices=list(TOOLBOXES))
    parser.add_argument('--names', nargs='+', help='only these backbone names')
    parser.add_argument('--markdown', help='also write the table to this file')
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    rows = sweep(args.toolboxes, args.names, lambda r: print(table_row(r), flush=True))
    text = table(rows)
    if args.markdown:
        from pathlib import Path
        atomic_write(args.markdown, lambda p: Path(p).write_text(text + '\n'))
    failed = [r['name'] for r in rows if r['error']]
    if failed:
        raise ToolError(f'{len(failed)} of {len(rows)} rows failed: {", ".join(failed)}')
    return 0


if __name__ == '__main__':
    from mmorepa.cli import run_tool
    run_tool(main)
