_base_ = '../_base_/orepa_imagenet_120e.py'
model = dict(backbone=dict(depth=101, reparam='none'), head=dict(in_channels=2048))
