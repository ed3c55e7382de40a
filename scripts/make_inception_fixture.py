#!/usr/bin/env python3
"""Reference features of pytorch-fid's FID Inception-v3 for the Rust port (crates/ddpm-cli/src/inception.rs).

Usage: make_inception_fixture.py [OUT_FILE]
  (default crates/ddpm-cli/tests/fixtures/inception.safetensors; needs torch, torchvision, pytorch-fid
  and safetensors: pip install pytorch-fid torchvision safetensors)

The real FID weights (pt_inception-2015-12-05-6726825d.pth) are not needed: the network is pytorch-fid's
own code (pytorch_fid.inception.InceptionV3 with its defaults: FID Inception, bilinear resize to
299x299 with align_corners=False, scaling to [-1, 1], the 2048-d pool3 features), loaded with
closed-form weights that the Rust test computes the same way, bit for bit, so that the 95 MB of
weights need not be stored. For tensor NAME with n elements, element k (row-major) is built from

  seed = FNV-1a-64(NAME as UTF-8)
  z    = splitmix64(seed + k)                      (mod 2^64)
  u    = f32(z >> 40) / 2^23 - 1                   in [-1, 1), exact in f32

  *.conv.weight  (O, C, kh, kw):  u * f32(sqrt(6 / (C kh kw)))   (He-uniform, keeps activations O(1))
  *.bn.weight:         1 + 0.25 u
  *.bn.bias:           0.1 u
  *.bn.running_mean:   0.1 u
  *.bn.running_var:    1 + 0.5 u                   in [0.5, 1.5)
  fc.weight, fc.bias:  0.01 u                      (unused by the features)

all in f32 arithmetic (0.1 is f32(0.1); the square root is taken in f64 and rounded to f32).

The file holds (f32):
  features.CASE.input   (N, C, H, W) in [0, 1]; C = 1 is repeated to 3 channels before the network
  features.CASE.output  (N, 2048), pytorch-fid's InceptionV3()(input)[0] flattened
  resize.CASE.input     (N, C, H, W)
  resize.CASE.output    (N, C, H', W'), F.interpolate(input, size=(H', W'), mode='bilinear',
                        align_corners=False) as pytorch-fid calls it; for the case `gray28_to_299` only
                        every 7th row and column (rows and columns 0, 7, ..., 294) to keep the file small
and in its metadata the versions of torch, torchvision and pytorch-fid, and `weights`: the JSON list of
[name, shape] of every float tensor of the state dict (what the Rust test regenerates).
"""
import json
import os
import sys
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import pytorch_fid
import pytorch_fid.inception as pfi
from safetensors.torch import save_file

MASK = (1 << 64) - 1


def fnv1a64(name):
    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h = ((h ^ b) * 0x100000001B3) & MASK
    return h


def uniform(name, n):
    """u_k in [-1, 1), k = 0..n-1, for tensor `name` (see the module docstring)."""
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) + np.uint64(fnv1a64(name))
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(2 ** 23) - np.float32(1)


def closed_form(name, shape):
    u = uniform(name, int(np.prod(shape)))
    f = np.float32
    if name.endswith("conv.weight"):
        fan_in = int(np.prod(shape[1:]))
        v = u * f(np.sqrt(6.0 / fan_in))
    elif name.endswith("bn.weight"):
        v = f(1) + f(0.25) * u
    elif name.endswith("bn.bias") or name.endswith("bn.running_mean"):
        v = f(0.1) * u
    elif name.endswith("bn.running_var"):
        v = f(1) + f(0.5) * u
    elif name.startswith("fc."):
        v = f(0.01) * u
    else:
        raise ValueError(f"no closed form for {name}")
    assert v.dtype == np.float32
    return torch.from_numpy(v.reshape(shape))


def fid_skeleton():
    """pytorch-fid's fid_inception_v3() network, before its weights are loaded (its state-dict names)."""
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
        return pfi.fid_inception_v3()


def closed_form_state():
    state = {}
    for name, t in fid_skeleton().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros_like(t)
        else:
            state[name] = closed_form(name, tuple(t.shape))
    return state


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "crates/ddpm-cli/tests/fixtures/inception.safetensors"
    torch.manual_seed(0)
    state = closed_form_state()
    # pytorch-fid's own InceptionV3 (resize, [-1, 1] scaling, blocks up to the final average pool),
    # its weight download replaced by the closed-form state dict
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    gen = torch.Generator().manual_seed(2015)
    tensors = {}
    cases = {
        "gray28": (1, 1, 28, 28),   # an MNIST-sized image, grayscale
        "rgb32": (2, 3, 32, 32),    # a CIFAR-10-sized batch of two
        "rgb20x37": (1, 3, 20, 37),  # not square
    }
    with torch.no_grad():
        for case, shape in cases.items():
            x = torch.rand(shape, generator=gen, dtype=torch.float32)
            rgb = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            y = model(rgb)[0].flatten(1)
            tensors[f"features.{case}.input"] = x
            tensors[f"features.{case}.output"] = y
            print(case, tuple(y.shape), "mean", y.mean().item(), "std", y.std().item(), "max", y.max().item())

        resize_cases = {
            "up": ((1, 2, 5, 7), (11, 13)),
            "down": ((1, 1, 13, 17), (4, 6)),
            "mixed": ((2, 1, 9, 4), (5, 10)),
            "same": ((1, 1, 6, 5), (6, 5)),
            "gray28_to_299": ((1, 1, 28, 28), (299, 299)),
        }
        for case, (shape, size) in resize_cases.items():
            x = torch.rand(shape, generator=gen, dtype=torch.float32)
            y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            if case == "gray28_to_299":
                y = y[:, :, ::7, ::7]
            tensors[f"resize.{case}.input"] = x
            tensors[f"resize.{case}.output"] = y.contiguous()

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_fid": pytorch_fid.__version__,
        "script": "scripts/make_inception_fixture.py",
        "weights": json.dumps([[k, list(v.shape)] for k, v in state.items() if v.is_floating_point()]),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata=meta)
    print("wrote", out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
