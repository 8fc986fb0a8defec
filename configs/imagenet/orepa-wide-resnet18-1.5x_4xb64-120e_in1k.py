_base_ = '../_base_/orepa_imagenet_120e.py'
model = dict(backbone=dict(depth=18, reparam='orepa', base_channels=96, stem_channels=96), head=dict(in_channels=768))
