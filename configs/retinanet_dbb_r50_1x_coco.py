# RetinaNet with DBB-ResNet-50 (paper Table 5): the vanilla config, its backbone a DBB OREPAResNet.
_base_ = './retinanet_r50_1x_coco.py'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', reparam='dbb',
    init_cfg=dict(checkpoint='checkpoints/dbb-resnet50_in1k.pth')))
