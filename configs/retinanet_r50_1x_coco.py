# RetinaNet with ResNet-50 (vanilla)
# (paper Table 5; supp 2.3: 1x schedule, SGD lr 0.02, lr x0.1 after epochs 8 and 11).
# Pretrained backbone: an ImageNet checkpoint of configs/imagenet/ (tools/train.py) or the official
# weights converted with tools/convert_official_checkpoint.py; its ``backbone.`` part is loaded.
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
pretrained = 'checkpoints/resnet50_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True, type='OREPAResNet', depth=50, reparam='none', num_stages=4,
        out_indices=(0, 1, 2, 3), frozen_stages=1, norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True, style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))
# supp 2.3: SGD with an initial learning rate of 0.02 for both detectors (mmdet's RetinaNet: 0.01)
optim_wrapper = dict(optimizer=dict(lr=0.02))
