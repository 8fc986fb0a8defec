# The demo OREPA-ResNet-18 classifier (./orepa_r18_shapes_cls.py) trained for INT8 deployment:
# each step adds crest_weight * (mean squared per-output-channel crest factor, max|w| / rms(w), of
# every squeezed kernel, over its fan-in) to the loss (mmorepa.quantization.CrestPenaltyOptimWrapper).
# OREPA's squeezed kernels put much of their mass on the centre tap (the 1x1 branches), so the
# fused kernels have peaky output channels that per-channel int8 rounds coarsely (docs/int8.md);
# the penalty flattens them. Inference and the fused (stock) model are unchanged.
_base_ = ['./orepa_r18_shapes_cls.py']

custom_imports = dict(imports=['mmorepa', 'mmorepa.quantization'], allow_failed_imports=False)

optim_wrapper = dict(type='CrestPenaltyOptimWrapper', crest_weight=1.0)
