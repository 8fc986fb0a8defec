_base_ = '../_base_/orepa_imagenet_120e.py'
model = dict(backbone=dict(depth=50, reparam='none', groups=32, width_per_group=4), head=dict(in_channels=2048))
