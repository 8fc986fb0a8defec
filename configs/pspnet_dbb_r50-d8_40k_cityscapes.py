# PSPNet with DBB-ResNet-50-D8 (paper Table 5): the vanilla config, its backbone a DBB OREPAResNet.
_base_ = './pspnet_r50-d8_40k_cityscapes.py'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', reparam='dbb',
    init_cfg=dict(checkpoint='checkpoints/dbb-resnet50_in1k.pth')))
