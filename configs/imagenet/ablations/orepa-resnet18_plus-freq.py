# Table 2, "+ Frequency prior filter".
_base_ = '../orepa-resnet18_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(
    branches=('kxk', '1x1', '1x1_kxk', '1x1_avg', '1x1_freq'), linear_deep_stem=False)))
