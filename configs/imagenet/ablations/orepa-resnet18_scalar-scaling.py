# Table 3, "Scalar scaling".
_base_ = '../orepa-resnet18_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(scaling='scalar')))
