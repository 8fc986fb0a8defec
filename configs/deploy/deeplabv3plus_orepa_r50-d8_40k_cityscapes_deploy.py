# Deploy form of deeplabv3plus_orepa_r50-d8_40k_cityscapes.py.
# The same network without OREPA, the toolbox's own backbone: what
# mmorepa.deploy.deploy_config generates (tests/test_deploy_configs.py checks them equal field by
# field). Weights: tools/deploy_convert.py or mmorepa.reparameterize.
_base_ = '../deeplabv3plus_orepa_r50-d8_40k_cityscapes.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, num_stages=4, out_indices=(0, 1,
    2, 3), dilations=(1, 1, 2, 4), strides=(1, 2, 1, 1), norm_cfg=dict(type='BN',
    requires_grad=True), norm_eval=False, style='pytorch', contract_dilation=True))
