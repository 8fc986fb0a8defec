# DeepLabV3+ with OREPA-ResNet-50-D8 (paper Table 5): the vanilla config with reparam='orepa'.
# supp 2.3: the pretrained stem (the linear deep stem) is not frozen; its learning rate is x0.1.
_base_ = ['./deeplabv3plus_r50-d8_40k_cityscapes.py', './_base_/orepa_stem_lr.py']
model = dict(backbone=dict(
    reparam='orepa', init_cfg=dict(checkpoint='checkpoints/orepa-resnet50_in1k.pth')))
optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
