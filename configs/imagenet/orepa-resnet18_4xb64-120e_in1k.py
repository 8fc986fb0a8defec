_base_ = '../_base_/orepa_imagenet_120e.py'
model = dict(backbone=dict(depth=18, reparam='orepa'))
