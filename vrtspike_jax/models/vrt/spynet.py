"""SpyNet optical flow (BasicSR layout, 6 pyramid levels) as used inside VRT, channels-last.

Flows are [N, H, W, 2] with channel 0 = dx (horizontal) and 1 = dy (vertical), in pixels of their own scale.
`SpyNet(ref, supp)` returns the flows that warp `supp` onto `ref`, finest first: scales 1, 1/2, 1/4, 1/8.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vrtspike_jax.models.vrt.layers import Conv2d
from vrtspike_jax.models.vrt.warping import avg_pool2x2, flow_warp, pad_replicate_end, resize_bilinear

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
RETURN_LEVELS = (2, 3, 4, 5)  # pyramid levels VRT asks for: scales 1/8, 1/4, 1/2, 1


class SpyNetBasicModule(nnx.Module):
    """Five 7x7 convolutions 8->32->64->32->16->2 with ReLU between them."""

    CHANNELS = (8, 32, 64, 32, 16, 2)

    def __init__(self, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.convs = nnx.List([
            Conv2d(cin, cout, 7, padding=3, param_dtype=param_dtype, rngs=rngs)
            for cin, cout in zip(self.CHANNELS[:-1], self.CHANNELS[1:])])

    def __call__(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = nnx.relu(x)
        return x


class SpyNet(nnx.Module):
    """SpyNet as in VRT (N:359-440). Always computed in float32: flows feed sampling coordinates."""

    def __init__(self, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.basic_module = nnx.List([SpyNetBasicModule(param_dtype=param_dtype, rngs=rngs) for _ in range(6)])

    @staticmethod
    def preprocess(images):
        return (images - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)

    def __call__(self, ref, supp):
        """ref, supp: [N, H, W, 3] in [0, 1]. Returns 4 flows [N, H/s, W/s, 2], s = 1, 2, 4, 8."""
        if ref.shape != supp.shape:
            raise ValueError(f"SpyNet needs equal shapes, got {ref.shape} and {supp.shape}")
        ref = ref.astype(jnp.float32)
        supp = supp.astype(jnp.float32)
        _, h, w, _ = ref.shape
        h_floor = int(math.floor(math.ceil(h / 32.0) * 32.0))
        w_floor = int(math.floor(math.ceil(w / 32.0) * 32.0))
        ref = resize_bilinear(ref, (h_floor, w_floor), align_corners=False)
        supp = resize_bilinear(supp, (h_floor, w_floor), align_corners=False)
        return self._process(ref, supp, h, w, h_floor, w_floor)

    def _process(self, ref, supp, h, w, h_floor, w_floor):
        refs = [self.preprocess(ref)]
        supps = [self.preprocess(supp)]
        for _ in range(5):
            refs.insert(0, avg_pool2x2(refs[0]))
            supps.insert(0, avg_pool2x2(supps[0]))
        n, h0, w0, _ = refs[0].shape
        flow = jnp.zeros((n, h0 // 2, w0 // 2, 2), jnp.float32)
        flows = []
        for level in range(len(refs)):
            _, fh, fw, _ = flow.shape
            up = resize_bilinear(flow, (2 * fh, 2 * fw), align_corners=True) * 2.0
            _, lh, lw, _ = refs[level].shape
            up = pad_replicate_end(up, int(up.shape[1] != lh), int(up.shape[2] != lw))
            warped = flow_warp(supps[level], up, "bilinear", "border")
            flow = self.basic_module[level](jnp.concatenate([refs[level], warped, up], axis=-1)) + up
            if level in RETURN_LEVELS:
                scale = 2 ** (5 - level)
                out = resize_bilinear(flow, (h // scale, w // scale), align_corners=False)
                factors = jnp.asarray([float(w // scale) / float(w_floor // scale),
                                       float(h // scale) / float(h_floor // scale)], jnp.float32)
                flows.insert(0, out * factors)
        return flows
