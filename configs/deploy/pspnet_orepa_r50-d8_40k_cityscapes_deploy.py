# Deploy form of pspnet_orepa_r50-d8_40k_cityscapes.py: the fused model is the
# toolbox's own ResNet (weights from
# tools/deploy_convert.py, or mmorepa.reparameterize), so mmorepa is not needed to run it.
_base_ = '../pspnet_orepa_r50-d8_40k_cityscapes.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                           dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), contract_dilation=True,
                           norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False,
                           style='pytorch'))
