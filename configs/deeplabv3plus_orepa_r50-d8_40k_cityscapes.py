# DeepLabV3+ with OREPA-ResNet-50-D8 (paper Table 5): the vanilla config, its backbone an OREPAResNet.
# supp 2.3: the pretrained stem (the linear deep stem) is not frozen; its learning rate is x0.1.
_base_ = ['./deeplabv3plus_r50-d8_40k_cityscapes.py', './_base_/orepa_stem_lr.py']
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(
    type='OREPAResNet', reparam='orepa',
    init_cfg=dict(checkpoint='checkpoints/orepa-resnet50_in1k.pth')))
optim_wrapper = dict(paramwise_cfg={{_base_.orepa_stem_lr}})
