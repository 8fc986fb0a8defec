# Detection / segmentation from a pretrained OREPA-ResNet (supp 2.3): the stem (the linear deep stem,
# ``backbone.conv1`` + ``backbone.bn1``) is not frozen (``frozen_stages=-1``) and its learning rate
# is a tenth of the rest. Use it as an extra base and refer to it (mmengine's base substitution):
#     _base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './_base_/orepa_stem_lr.py']
#     optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
orepa_stem_lr = dict(custom_keys={
    'backbone.conv1.': dict(lr_mult=0.1),
    'backbone.bn1.': dict(lr_mult=0.1),
})
