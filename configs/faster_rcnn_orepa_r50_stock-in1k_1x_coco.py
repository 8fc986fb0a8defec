# Faster R-CNN with OREPA-ResNet-50 started from mmpretrain's stock ImageNet ResNet-50 (no OREPA
# ImageNet weights needed): ./faster_rcnn_orepa_r50_1x_coco.py with ./_base_/stock_resnet50_in1k.py as the backbone's
# checkpoint. The log shows, after "load backbone. in model from: ...", one line per OREPA layer:
# "<layer name> (<OREPA layer type>): seeded from a plain kxk conv weight, squeezed kernel exact".
# Batch and lr: 8 GPUs x 2 images (batch 16), SGD lr 0.02. On another GPU count add
# --cfg-options auto_scale_lr.enable=True (mmdet's base_batch_size=16: lr x batch / 16), as
# mmdet's own configs leave it off and its train.py --auto-scale-lr turns it on.
_base_ = ['./faster_rcnn_orepa_r50_1x_coco.py', './_base_/stock_resnet50_in1k.py']
model = dict(backbone=dict(init_cfg=dict(checkpoint={{_base_.stock_resnet50_in1k}})))
