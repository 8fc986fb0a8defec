# Table 3, "W/o scaling".
_base_ = '../orepa-resnet18_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(scaling='none')))
