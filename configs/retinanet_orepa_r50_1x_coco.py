# RetinaNet with OREPA-ResNet-50 (paper Table 5): the vanilla config, its backbone an OREPAResNet.
# supp 2.3: the pretrained stem (the linear deep stem) is not frozen; its learning rate is x0.1.
# Batch and lr: 8 GPUs x 2 images (batch 16), SGD lr 0.02. On another GPU count add
# --cfg-options auto_scale_lr.enable=True (mmdet's base_batch_size=16: lr x batch / 16), as
# mmdet's own configs leave it off and its train.py --auto-scale-lr turns it on.
_base_ = ['./retinanet_r50_1x_coco.py', './_base_/orepa_stem_lr.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', reparam='orepa', frozen_stages=-1,
    init_cfg=dict(checkpoint='checkpoints/orepa-resnet50_in1k.pth')))
optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
