# Deploy form of imagenet/orepa-resnet50_4xb64-120e_in1k.py: the fused model is the
# toolbox's own ResNet (weights from
# tools/deploy_convert.py, or mmorepa.reparameterize), so mmorepa is not needed to run it.
_base_ = '../imagenet/orepa-resnet50_4xb64-120e_in1k.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, stem_channels=64, out_indices=(3, )))
