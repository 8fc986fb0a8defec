# The demo OREPA-ResNet-18 classifier (./orepa_r18_shapes_cls.py) trained for INT8 deployment:
# every OREPA layer's squeezed kernel is rounded to its symmetric per-output-channel int8 grid in
# training (straight-through gradient), in eval and when fused (orepa_cfg.fake_quant_bits). The
# norm folded in at fusion scales whole output channels, so the fused kernel lies exactly on the
# grid that per-channel int8 weight quantization (onnxruntime, TensorRT) gives it: the weights of
# the OREPA convs quantize without loss, and the network was trained with those weights.
# Train, test, fuse and quantize with this config (docs/int8.md); the fused model is the stock
# ResNet, as always.
_base_ = ['./orepa_r18_shapes_cls.py']

model = dict(backbone=dict(orepa_cfg=dict(fake_quant_bits=8)))
