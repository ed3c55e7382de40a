"""Writes a tiny Hugging Face Hub cache with parquet datasets laid out as the Hub's
`refs/convert/parquet` branch, for the tests of `--data fashion-mnist` / `--data cifar10`.

Usage: python scripts/make_hub_data_fixtures.py tests/fixtures/hub_cache
Needs pyarrow and Pillow. The images are patterns whose pixel values the tests compute by hand:
  fashion-mnist, image k (28x28 gray): p(y, x) = (7 k + 3 y + x) mod 256; one extra train row holds
  bytes that are not an image (the loader must skip it with a warning).
  cifar10, image k (32x32 RGB): R = 8 x, G = 8 y, B = 40 k.
"""
import io
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write(root, repo_folder, config, split, image_col, images, labels):
    snap = root / repo_folder / "snapshots" / COMMIT / config / split
    snap.mkdir(parents=True, exist_ok=True)
    ref = root / repo_folder / "refs" / "refs" / "convert" / "parquet"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(COMMIT)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        image_col: pa.array([{"bytes": b, "path": None} for b in images], type=img_type),
        "label": pa.array(labels, type=pa.int64()),
    })
    pq.write_table(table, snap / "0000.parquet", compression="snappy")


def fashion(k):
    return Image.frombytes("L", (28, 28), bytes((7 * k + 3 * y + x) % 256 for y in range(28) for x in range(28)))


def cifar(k):
    return Image.frombytes("RGB", (32, 32), bytes(v for y in range(32) for x in range(32) for v in (8 * x, 8 * y, 40 * k)))


def main(root):
    root = Path(root)
    f = "datasets--zalando-datasets--fashion_mnist"
    write(root, f, "fashion_mnist", "train", "image", [png(fashion(k)) for k in range(6)] + [b"not an image"], list(range(7)))
    write(root, f, "fashion_mnist", "test", "image", [png(fashion(k)) for k in range(6, 9)], [0, 1, 2])
    c = "datasets--uoft-cs--cifar10"
    write(root, c, "plain_text", "train", "img", [png(cifar(k)) for k in range(4)], [0, 1, 2, 3])
    write(root, c, "plain_text", "test", "img", [png(cifar(k)) for k in range(4, 6)], [4, 5])


if __name__ == "__main__":
    main(sys.argv[1])
