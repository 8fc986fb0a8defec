# Faster R-CNN with ResNet-50 (vanilla): mmdet's own config and backbone
# (paper Table 5; supp 2.3: 1x schedule, SGD lr 0.02, lr x0.1 after epochs 8 and 11).
# Pretrained backbone: an ImageNet checkpoint of configs/imagenet/ (tools/train.py) or the official
# weights converted with tools/convert_official_checkpoint.py; its ``backbone.`` part is loaded.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py']
model = dict(backbone=dict(init_cfg=dict(
    type='Pretrained', checkpoint='checkpoints/resnet50_in1k.pth', prefix='backbone.')))
