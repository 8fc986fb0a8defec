# OREPA in mmpretrain's own CIFAR-10 config, its backbone kept: ResNet_CIFAR (3x3 stride-1 stem,
# no max-pool) with OREPA layers.
_base_ = 'mmpretrain::resnet/resnet18_8xb16_cifar10.py'
custom_imports = dict(imports=['mmorepa'], allow_failed_imports=False)
model = dict(backbone=dict(type='OREPAResNet_CIFAR'))
