# Deploy form of retinanet_orepa_r50_1x_coco.py: the fused model is the
# toolbox's own ResNet (weights from
# tools/deploy_convert.py, or mmorepa.reparameterize), so mmorepa is not needed to run it.
_base_ = '../retinanet_orepa_r50_1x_coco.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                           frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True),
                           norm_eval=True, style='pytorch'))
