# RetinaNet with DBB-ResNet-50 (paper Table 5): the vanilla config with reparam='dbb'.
_base_ = './retinanet_r50_1x_coco.py'
model = dict(backbone=dict(
    reparam='dbb', init_cfg=dict(checkpoint='checkpoints/dbb-resnet50_in1k.pth')))
