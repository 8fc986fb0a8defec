# Deploy form of faster_rcnn_orepa_r50_1x_coco.py.
# The same network without OREPA, the toolbox's own backbone: what
# mmorepa.deploy.deploy_config generates (tests/test_deploy_configs.py checks them equal field by
# field). Weights: tools/deploy_convert.py or mmorepa.reparameterize.
_base_ = '../faster_rcnn_orepa_r50_1x_coco.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, num_stages=4, out_indices=(0, 1,
    2, 3), frozen_stages=-1, norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True,
    style='pytorch'))
