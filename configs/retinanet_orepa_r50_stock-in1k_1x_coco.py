# RetinaNet with OREPA-ResNet-50 started from mmpretrain's stock ImageNet ResNet-50 (no OREPA
# ImageNet weights needed): ./retinanet_orepa_r50_1x_coco.py with ./_base_/stock_resnet50_in1k.py as the backbone's
# checkpoint. The log shows, after "load backbone. in model from: ...", one line per OREPA layer:
# "<layer name> (<OREPA layer type>): seeded from a plain kxk conv weight, squeezed kernel exact".
_base_ = ['./retinanet_orepa_r50_1x_coco.py', './_base_/stock_resnet50_in1k.py']
model = dict(backbone=dict(init_cfg=dict(checkpoint={{_base_.stock_resnet50_in1k}})))
