# Table 2, "+ Online": DBB's four branches, linearized (scaling vectors + post-addition BN).
_base_ = '../orepa-resnet18_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(
    branches=('kxk', '1x1', '1x1_kxk', '1x1_avg'), linear_deep_stem=False)))
