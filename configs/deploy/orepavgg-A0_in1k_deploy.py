# Deploy form of imagenet/orepavgg-A0_4xb64-120e_in1k.py: mmpretrain's own RepVGG with deploy=True.
_base_ = '../imagenet/orepavgg-A0_4xb64-120e_in1k.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='RepVGG', arch='A0', out_indices=(3, ), deploy=True))
