_base_ = '../_base_/orepa_imagenet_120e.py'
model = dict(
    backbone=dict(_delete_=True, type='OREPAVGG', arch='A2', reparam='repvgg', out_indices=(3, )),
    head=dict(in_channels=1408))
