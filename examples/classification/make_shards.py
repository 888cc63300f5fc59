"""scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package) -> shards.

    python examples/classification/make_shards.py --out data/digits
    python examples/classification/make_shards.py --out s3://bucket/digits --storage-option endpoint_url=http://...

A stratified 80/20 split (fixed seed): ``train-000000.tar ..`` and ``test-000000.tar``. Each
sample: ``__key__`` (the image's index in ``load_digits``), ``png`` (8x8 grayscale) and
``cls`` (the digit). The last two lines printed are the train and test shard patterns.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

import fsspec
import numpy as np
import webdataset as wds
from PIL import Image

from infobatch_stream.storage import storage_option


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(out_fs, out_root: str, prefix: str, indices, images, labels, shard_size: int) -> int:
    with tempfile.TemporaryDirectory(prefix="digits-shards-") as work:
        names: list[str] = []

        def upload(local: str) -> None:
            out_fs.put_file(local, f"{out_root}/{os.path.basename(local)}")
            names.append(os.path.basename(local))

        with wds.ShardWriter(os.path.join(work, f"{prefix}-%06d.tar"), maxcount=shard_size,
                             post=upload, verbose=0) as sink:
            for i in indices:
                sink.write({"__key__": f"{i:04d}", "png": png_bytes(images[i]), "cls": int(labels[i])})
    return len(names)


def write_digits(out: str, shard_size: int = 500,
                 storage_options: dict | None = None) -> tuple[str, str, int, int]:
    """Write the split; returns (train pattern, test pattern, train size, test size)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)   # 0..16 -> 0..255
    train, test = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0,
                                   stratify=digits.target)
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    root = root.rstrip("/")
    n_train = write_split(fs, root, "train", sorted(train), images, digits.target, shard_size)
    write_split(fs, root, "test", sorted(test), images, digits.target, len(test))
    base = out.rstrip("/")
    train_pattern = (f"{base}/train-{{000000..{n_train - 1:06d}}}.tar" if n_train > 1
                     else f"{base}/train-000000.tar")
    return train_pattern, f"{base}/test-000000.tar", len(train), len(test)


def main(argv: list[str] | None = None) -> tuple[str, str, int, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder or fsspec URL for the shards")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        type=storage_option)
    args = parser.parse_args(argv)
    result = write_digits(args.out, args.shard_size, dict(args.storage_option))
    train, test, n_train, n_test = result
    print(f"wrote {n_train} training and {n_test} test samples")
    print(train)
    print(test)
    return result


if __name__ == "__main__":
    main()
