"""A model that defeats naive INT8: the demo CNN with one activation channel ~1000x larger than the rest.

Channel 0 after the first conv-bn-relu is scaled up by OUTLIER and the next conv's weights for that channel
are scaled down by the same factor, so the FP32 function is unchanged (ReLU is positively homogeneous) but a
per-tensor activation scale spends its whole range on one channel and rounds every other channel to ~0.
"""
from __future__ import annotations

import torch

from edgebuild.pipeline.demo_model import load_demo

OUTLIER = 1000.0


def outlier_demo() -> torch.nn.Module:
    model = load_demo()
    bn, conv2 = model.features[1], model.features[3]
    with torch.no_grad():
        bn.weight[0] *= OUTLIER
        bn.bias[0] *= OUTLIER
        conv2.weight[:, 0] /= OUTLIER
    return model.eval()
