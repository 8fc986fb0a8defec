# Deploy form of imagenet/orepa-resnet50_4xb64-120e_in1k.py.
# The same network without OREPA, the toolbox's own backbone: what
# mmorepa.deploy.deploy_config generates (tests/test_deploy_configs.py checks them equal field by
# field). Weights: tools/deploy_convert.py or mmorepa.reparameterize.
_base_ = '../imagenet/orepa-resnet50_4xb64-120e_in1k.py'
custom_imports = dict(_delete_=True, imports=[], allow_failed_imports=False)
model = dict(backbone=dict(_delete_=True, type='ResNet', depth=50, out_indices=(3,)))
