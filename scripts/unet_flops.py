#!/usr/bin/env python3
"""Floating-point operations of one UNet2DModel per image, counted by PyTorch's FlopCounterMode
(convolutions, matrix products and attention; elementwise ops are not counted).

Run:  python3 scripts/unet_flops.py --config path/to/config.json
Prints one JSON line: forward FLOPs per image and training FLOPs per image (forward + backward),
the numerators of "fraction of the GPU's peak" (FLOPs per image x images/s / peak FLOP/s).
"""
import argparse, json
import torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DModel

p = argparse.ArgumentParser()
p.add_argument("--config", required=True, help="a diffusers UNet2DModel config.json")
p.add_argument("--batch", type=int, default=2)
a = p.parse_args()
cfg = json.load(open(a.config))
model = UNet2DModel.from_config(cfg)
s = cfg.get("sample_size", 32)
x = torch.randn(a.batch, cfg.get("in_channels", 3), s, s)
t = torch.randint(0, 1000, (a.batch,))
with FlopCounterMode(display=False) as fwd:
    with torch.no_grad():
        model(x, t)
with FlopCounterMode(display=False) as train:
    model(x, t).sample.square().mean().backward()
print(json.dumps({"config": a.config, "forward_flops_per_image": fwd.get_total_flops() / a.batch,
                  "train_flops_per_image": train.get_total_flops() / a.batch}))
