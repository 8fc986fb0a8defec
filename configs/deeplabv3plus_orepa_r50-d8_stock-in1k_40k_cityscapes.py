# DeepLabV3+ with OREPA-ResNet-50 started from mmpretrain's stock ImageNet ResNet-50 (no OREPA
# ImageNet weights needed): ./deeplabv3plus_orepa_r50-d8_40k_cityscapes.py with ./_base_/stock_resnet50_in1k.py as the backbone's
# checkpoint. The log shows, after "load backbone. in model from: ...", one line per OREPA layer:
# "<layer name> (<OREPA layer type>): seeded from a plain kxk conv weight, squeezed kernel exact".
_base_ = ['./deeplabv3plus_orepa_r50-d8_40k_cityscapes.py', './_base_/stock_resnet50_in1k.py']
model = dict(backbone=dict(init_cfg=dict(checkpoint={{_base_.stock_resnet50_in1k}})))
