#!/usr/bin/env python3
"""Loads a folder written by `ddpm export` with diffusers, as a user would, and samples from it.

    python scripts/check_export.py EXPORTED_DIR out.png [--steps 1000]

Needs torch and diffusers (python3 -m venv v && v/bin/pip install torch diffusers). Prints the
pipeline's components and writes a grid of 16 samples.
"""
import argparse
import torch
from diffusers import DDPMPipeline

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("out")
p.add_argument("--steps", type=int, default=1000)
a = p.parse_args()
pipe = DDPMPipeline.from_pretrained(a.folder)
print(type(pipe).__name__, type(pipe.unet).__name__, type(pipe.scheduler).__name__,
      sum(x.numel() for x in pipe.unet.parameters()), "parameters")
images = pipe(batch_size=16, generator=torch.manual_seed(0), num_inference_steps=a.steps).images
w, h = images[0].size
from PIL import Image
grid = Image.new("RGB", (4 * w, 4 * h))
for i, im in enumerate(images):
    grid.paste(im.convert("RGB"), ((i % 4) * w, (i // 4) * h))
grid.save(a.out)
print("wrote", a.out)
