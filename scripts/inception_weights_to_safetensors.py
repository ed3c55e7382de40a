#!/usr/bin/env python3
"""Converts pytorch-fid's FID Inception-v3 weights to the safetensors file that
ddpm_cli::inception::Inception::load reads.

Usage: inception_weights_to_safetensors.py OUT.safetensors [--pth PATH]
  (needs: pip install torch torchvision pytorch-fid safetensors)

Without --pth the weights come through pytorch-fid's own download
(pytorch_fid.inception.FID_WEIGHTS_URL, pt_inception-2015-12-05-6726825d.pth, into torch's hub cache),
which needs network access; --pth reads an already downloaded copy. The state dict is first loaded
into pytorch-fid's fid_inception_v3() network (strictly: every name and shape must match), then that
network's state dict is written as it is, in f32, with the names the Rust loader expects
(`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, ...), plus `fc.*` and the batch
norms' `num_batches_tracked`, which the loader ignores. The metadata records the source and versions.
"""
import argparse
import os
from unittest import mock

import torch
import pytorch_fid
import pytorch_fid.inception as pfi
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the safetensors file to write")
    ap.add_argument("--pth", help="pt_inception-2015-12-05-6726825d.pth already downloaded (default: download it)")
    a = ap.parse_args()

    if a.pth:
        state = torch.load(a.pth, map_location="cpu", weights_only=True)
        with mock.patch.object(pfi, "load_state_dict_from_url", lambda *args, **kw: state):
            net = pfi.fid_inception_v3()
        source = os.path.basename(a.pth)
    else:
        net = pfi.fid_inception_v3()  # downloads FID_WEIGHTS_URL into torch's hub cache
        source = pfi.FID_WEIGHTS_URL.rsplit("/", 1)[-1]

    tensors = {}
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        tensors[name] = t.float() if t.is_floating_point() else t
    meta = {"source": source, "torch": torch.__version__, "pytorch_fid": pytorch_fid.__version__,
            "script": "scripts/inception_weights_to_safetensors.py"}
    save_file(tensors, a.out, metadata=meta)
    n = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    print(f"wrote {a.out}: {len(tensors)} tensors, {n} parameters and statistics")


if __name__ == "__main__":
    main()
