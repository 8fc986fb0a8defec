# OREPA in mmseg's own PSPNet config, its backbone kept: ResNetV1c (three 3x3 stem convs, D8
# dilations) with OREPA layers; open-mmlab://resnet50_v1c seeds it exactly.
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(type='OREPAResNetV1c'))
