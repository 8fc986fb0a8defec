# Table 2, "+ Linear depthwise separable" (all six branches, plain 7x7 stem).
_base_ = '../orepa-resnet18_4xb64-120e_in1k.py'
model = dict(backbone=dict(orepa_cfg=dict(linear_deep_stem=False)))
