#!/usr/bin/env python3
"""PyTorch `.bin` fixtures for the bounded reader of crates/ddpm-unet/src/torch_pickle (issue 22).

Usage: make_hostile_bin_fixtures.py FIXTURES_DIR   (needs torch and safetensors; writes two folders)

FIXTURES_DIR/torch-bin/: real `torch.save` files and their reference values
  parity.bin            torch.save (pickle protocol 2, the default) of a module's state dict (an
                        OrderedDict with `_metadata`) plus f16, bf16, f64, int64 tensors, a transposed
                        view and a slice (non-contiguous, with a storage offset) sharing storages,
                        a 0-dim tensor, an empty tensor, an nn.Parameter and a permuted f16 view
  parity-proto4.bin     the same dict saved with pickle_protocol=4 (FRAME, SHORT_BINUNICODE,
                        MEMOIZE, STACK_GLOBAL)
  parity.safetensors    every tensor of that dict as a contiguous copy, written by safetensors:
                        the values the reader must return

FIXTURES_DIR/hostile/: crafted files, each tiny, that must give a one-line error and no panic
  rebuild-no-args.bin   `_rebuild_tensor_v2()` called with no arguments
  huge-tensor.bin       a 100000 x 100000 f32 tensor over a storage declared as 1e10 elements,
                        whose entry holds 4 bytes (40 GB asked for by a reader that trusts it)
  memo-bomb.bin         a tuple referring twice to the previous one, 30 levels deep (2^30 leaves
                        for a reader that copies what BINGET returns)
  deep-nesting.bin      20,000 nested 1-tuples (a recursive reader overflows its stack)
  os-system.bin         Python's pickle of `os.system('echo owned')` (GLOBAL posix.system + REDUCE)
  truncated.bin         a real torch.save file cut to 60% of its length
  wrong-entry-size.bin  a real torch.save file whose storage entry data/0 lost its last 4 bytes
  view-out-of-bounds.bin a (2, 2) view with strides (2, 1) at offset 1 of a 4-element storage
  broadcast-bomb.bin    a stride-0 view of a 1-element storage as 100000 x 100000 elements
  compressed.bin        a real torch.save file rewritten with deflated entries

Files are written with the layout torch uses (ARCHIVE/data.pkl, ARCHIVE/byteorder,
ARCHIVE/data/KEY, ARCHIVE/version); the crafted pickles come from Python's own pickler (with a
persistent_id as torch's) where it can express them, by hand otherwise.
"""
import collections
import io
import os
import pickle
import sys
import zipfile

import torch
from safetensors.torch import save_file

out = sys.argv[1]
good_dir = os.path.join(out, "torch-bin")
bad_dir = os.path.join(out, "hostile")
os.makedirs(good_dir, exist_ok=True)
os.makedirs(bad_dir, exist_ok=True)


# ---- real torch.save files and their reference values
def parity_dict():
    torch.manual_seed(22)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    sd = m.state_dict()  # an OrderedDict with `_metadata`, as diffusers' save_pretrained saves
    base = torch.randn(3, 4)
    wide = torch.randn(3, 5)
    half3 = torch.randn(2, 3, 4).half()
    sd["half"] = torch.randn(3, 5).half()
    sd["bf16"] = torch.randn(2, 3, 4).bfloat16()
    sd["f64"] = torch.randn(4).double()
    sd["long"] = torch.arange(5) * 7 - 11
    sd["base"] = base
    sd["transposed"] = base.t()  # same storage, strides (1, 4)
    sd["slice"] = wide[1:, 2:]  # storage offset 7, strides (5, 1), not contiguous
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2))  # _rebuild_parameter
    sd["permuted_half"] = half3.permute(2, 0, 1)
    return sd


sd = parity_dict()
torch.save(sd, os.path.join(good_dir, "parity.bin"))
torch.save(sd, os.path.join(good_dir, "parity-proto4.bin"), pickle_protocol=4)
save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, os.path.join(good_dir, "parity.safetensors"))


# ---- crafted files
def entry(name, compression=zipfile.ZIP_STORED):
    """A zip entry dated 1980-01-01, so that the files are the same on every run."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compression
    return info


def archive(path, pickle_bytes, storages):
    """A zip laid out as torch.save lays it out."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(entry("archive/data.pkl"), pickle_bytes)
        z.writestr(entry("archive/byteorder"), b"little")
        for key, data in storages.items():
            z.writestr(entry(f"archive/data/{key}"), data)
        z.writestr(entry("archive/version"), b"3\n")


class FakeStorage:
    """A storage as torch's persistent_id names it."""

    def __init__(self, key, numel, storage_type=torch.FloatStorage):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class FakeTensor:
    """Pickles as torch pickles a tensor, with whatever arguments it is given."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None


def dumps(obj):
    b = io.BytesIO()
    TorchLikePickler(b, protocol=2).dump(obj)
    return b.getvalue()


class NoArgs:
    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, ())


class System:
    def __reduce__(self):
        return (os.system, ("echo owned",))


hooks = collections.OrderedDict()
archive(os.path.join(bad_dir, "rebuild-no-args.bin"), dumps({"w": NoArgs()}), {})
archive(os.path.join(bad_dir, "huge-tensor.bin"),
        dumps({"w": FakeTensor(FakeStorage("0", 10**10), 0, (100000, 100000), (100000, 1), False, hooks)}),
        {"0": b"\0" * 4})
bomb = ("a", "b")
for _ in range(30):
    bomb = (bomb, bomb)
archive(os.path.join(bad_dir, "memo-bomb.bin"), dumps({"w": bomb}), {})
# PROTO 2, EMPTY_DICT, BINUNICODE 'w', EMPTY_TUPLE, TUPLE1 x 20000, SETITEM, STOP
deep = b"\x80\x02}X\x01\x00\x00\x00w)" + b"\x85" * 20000 + b"s."
archive(os.path.join(bad_dir, "deep-nesting.bin"), deep, {})
archive(os.path.join(bad_dir, "os-system.bin"), pickle.dumps({"w": System()}, protocol=2), {})
archive(os.path.join(bad_dir, "view-out-of-bounds.bin"),
        dumps({"w": FakeTensor(FakeStorage("0", 4), 1, (2, 2), (2, 1), False, hooks)}),
        {"0": torch.arange(4.0).numpy().tobytes()})
archive(os.path.join(bad_dir, "broadcast-bomb.bin"),
        dumps({"w": FakeTensor(FakeStorage("0", 1), 0, (100000, 100000), (0, 0), False, hooks)}),
        {"0": torch.ones(1).numpy().tobytes()})

small = io.BytesIO()
torch.save({"w": torch.arange(16.0).reshape(4, 4), "b": torch.ones(4)}, small)
small = small.getvalue()
with open(os.path.join(bad_dir, "truncated.bin"), "wb") as f:
    f.write(small[: len(small) * 6 // 10])


def rewrite(path, compression=zipfile.ZIP_STORED, edit=lambda name, data: data):
    src = zipfile.ZipFile(io.BytesIO(small))
    with zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            z.writestr(entry(info.filename, compression), edit(info.filename, src.read(info.filename)))


rewrite(os.path.join(bad_dir, "wrong-entry-size.bin"),
        edit=lambda name, data: data[:-4] if name.endswith("/data/0") else data)
rewrite(os.path.join(bad_dir, "compressed.bin"), compression=zipfile.ZIP_DEFLATED)

for d in (good_dir, bad_dir):
    for f in sorted(os.listdir(d)):
        print(os.path.join(d, f), os.path.getsize(os.path.join(d, f)))
