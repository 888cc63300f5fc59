"""An image folder in FFHQ's layout -> webdataset shards on any fsspec URL (local, s3://, ...).

FFHQ ships ``images1024x1024/`` and ``thumbnails128x128/``, either nested in folders of 1000
(``00000/00000.png .. 00999.png``, ``01000/01000.png ..``) or flat (``00000.png``). Every
image becomes one sample: ``__key__`` is the image id (the file name without extension),
``png``/``jpg`` the image bytes (copied as they are, or re-encoded with ``--resize``).

    python examples/ffhq_diffusion/make_shards.py ~/ffhq --resize 64 --ids 0:60000 \\
        --out s3://my-bucket/ffhq64 --prefix train
    python examples/ffhq_diffusion/make_shards.py ~/ffhq --resize 64 --ids 60000:70000 \\
        --out s3://my-bucket/ffhq64 --prefix heldout

Shards are written to a local temporary folder, each one uploaded with fsspec as soon as it
is complete (a single PUT on S3, so a reader never sees half a shard). S3 credentials and
the endpoint come from the usual AWS variables or ``--storage-option key=value``. The last
line printed is the brace pattern of the shards, for ``train.py --shards``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile

import fsspec
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from infobatch_stream.storage import storage_option

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FFHQ_FOLDERS = ("images1024x1024", "thumbnails128x128")


def image_folder(root: str) -> str:
    """``root`` itself, or its single FFHQ image folder (``images1024x1024`` / ``thumbnails...``)."""
    found = [name for name in sorted(os.listdir(root))
             if os.path.isdir(os.path.join(root, name))
             and (name in FFHQ_FOLDERS or re.fullmatch(r"images\d+x\d+", name))]
    if len(found) > 1:
        raise SystemExit(f"{root} holds several image folders ({', '.join(found)}); pass one of them")
    return os.path.join(root, found[0]) if found else root


def list_images(root: str, ids: tuple[int, int] | None = None) -> list[tuple[str, str]]:
    """(image id, path) of every image under ``root``, nested or flat, sorted by id."""
    folder = image_folder(root)
    images = []
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                images.append((stem, os.path.join(directory, name)))
    if ids is not None:
        images = [(i, p) for i, p in images if i.isdigit() and ids[0] <= int(i) < ids[1]]
    images.sort(key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0, item[0]))
    seen = set()
    for image_id, path in images:
        if image_id in seen:
            raise SystemExit(f"image id {image_id} appears twice under {folder} (e.g. {path}); "
                             f"ids are the samples' keys and must be unique")
        seen.add(image_id)
    return images


def encode(path: str, resize: int | None) -> tuple[str, bytes]:
    """(extension, bytes): the file as it is, or resized (Lanczos) and re-encoded as PNG."""
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if resize is None:
        with open(path, "rb") as f:
            return ext, f.read()
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (resize, resize):
            image = image.resize((resize, resize), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shards(src: str, out: str, prefix: str = "train", shard_size: int = 1000,
                 resize: int | None = None, ids: tuple[int, int] | None = None,
                 storage_options: dict | None = None, progress: bool = True) -> tuple[str, int]:
    """Write the images of ``src`` as shards under ``out``; returns (brace pattern, samples)."""
    images = list_images(src, ids)
    if not images:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_folder(src)}"
                         + (f" with ids in [{ids[0]}, {ids[1]})" if ids else ""))
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    names: list[str] = []

    with tempfile.TemporaryDirectory(prefix="make-shards-") as work:
        def upload(local: str) -> None:
            name = os.path.basename(local)
            fs.put_file(local, f"{root.rstrip('/')}/{name}")
            os.remove(local)
            names.append(name)

        pattern = os.path.join(work, f"{prefix}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, post=upload, verbose=0) as sink:
            for image_id, path in tqdm(images, desc=f"shards -> {out}", unit="img", disable=not progress):
                ext, data = encode(path, resize)
                sink.write({"__key__": image_id, ext: data})

    last = len(names) - 1
    brace = f"{prefix}-{{000000..{last:06d}}}.tar" if last else f"{prefix}-000000.tar"
    return f"{out.rstrip('/')}/{brace}", len(images)


def parse_ids(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep:
        raise SystemExit(f"--ids wants START:STOP (e.g. 60000:70000), got {text!r}")
    return int(start or 0), int(stop) if stop else sys.maxsize


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", help="FFHQ root (holding images1024x1024/ or thumbnails128x128/) "
                                    "or an image folder")
    parser.add_argument("--out", required=True, help="where the shards go: a folder or fsspec URL")
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--resize", type=int, default=None, help="resize to SIZE x SIZE (PNG)")
    parser.add_argument("--ids", default=None, help="only image ids in START:STOP (e.g. 60000:70000)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        type=storage_option,
                        help="fsspec option for --out (repeatable), e.g. endpoint_url=http://...")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    pattern, count = write_shards(args.src, args.out, args.prefix, args.shard_size, args.resize,
                                  parse_ids(args.ids), dict(args.storage_option),
                                  progress=not args.quiet)
    print(f"wrote {count} samples; use: --shards '{pattern}' --dataset_size {count}")
    print(pattern)
    return pattern


if __name__ == "__main__":
    main()
