# Table 2 (ResNet-50), everything but "+ Rep-1x1".
_base_ = '../orepa-resnet50_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(rep_1x1=False)))
