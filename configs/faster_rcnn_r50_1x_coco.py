# Faster R-CNN with ResNet-50 (vanilla): mmdet's own config and backbone
# (paper Table 5; supp 2.3: 1x schedule, SGD lr 0.02, lr x0.1 after epochs 8 and 11).
# Pretrained backbone: an ImageNet checkpoint of configs/imagenet/ (tools/train.py) or the official
# weights converted with tools/convert_official_checkpoint.py; its ``backbone.`` part is loaded.
# Batch and lr: 8 GPUs x 2 images (batch 16), SGD lr 0.02. On another GPU count add
# --cfg-options auto_scale_lr.enable=True (mmdet's base_batch_size=16: lr x batch / 16), as
# mmdet's own configs leave it off and its train.py --auto-scale-lr turns it on.
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py']
model = dict(backbone=dict(init_cfg=dict(
    type='Pretrained', checkpoint='checkpoints/resnet50_in1k.pth', prefix='backbone.')))
