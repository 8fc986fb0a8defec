# PSPNet with DBB-ResNet-50-D8 (paper Table 5): the vanilla config with reparam='dbb'.
_base_ = './pspnet_r50-d8_40k_cityscapes.py'
model = dict(backbone=dict(
    reparam='dbb', init_cfg=dict(checkpoint='checkpoints/dbb-resnet50_in1k.pth')))
