"""Procedurally drawn faces in FFHQ's folder layout: the demo's data, no download needed.

Each face is a pure function of its id (a seeded ``numpy`` generator per image), so the
same id always draws the same face on any machine. What varies: skin tone, face shape,
head tilt and turn, hair colour and style, eye size, gap and colour, blinks, eyebrows,
mouth (smile, neutral, frown, open), glasses, clothing and background.

    python examples/ffhq_diffusion/faces.py --out data/faces --count 1200

writes ``data/faces/thumbnails128x128/00000/00000.png ... /01000/01199.png``, as FFHQ
lays out its 70,000 images (folders of 1000, named by the first id they hold).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 90],
                 [160, 100, 64], [118, 72, 44], [84, 52, 34]], np.float64)
HAIR = [(20, 16, 14), (62, 40, 24), (110, 72, 40), (200, 160, 90), (160, 60, 30),
        (170, 170, 170), (235, 225, 200)]
IRIS = [(60, 40, 20), (40, 90, 150), (60, 110, 60), (30, 30, 30), (110, 80, 40)]


def _color(rng: np.random.Generator, base, jitter: float) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(base, float) + rng.normal(0, jitter, 3), 0, 255))


def draw_face(image_id: int, size: int = 128) -> Image.Image:
    """The face of ``image_id`` as a ``size`` x ``size`` RGB image (drawn at 2x, then downsampled)."""
    rng = np.random.default_rng([image_id, 0x0FACE])
    s = 2 * size
    u = s / 128.0  # the drawing is designed on a 128-unit square

    background = _color(rng, rng.uniform(40, 230, 3), 0)
    img = Image.new("RGB", (s, s), background)
    d = ImageDraw.Draw(img)

    cx = s / 2 + rng.normal(0, 5) * u           # head position
    cy = s / 2 + rng.normal(2, 4) * u
    w = rng.uniform(30, 40) * u                 # half-width and half-height of the face
    h = w * rng.uniform(1.15, 1.45)
    turn = rng.uniform(-0.35, 0.35)             # yaw: features slide sideways
    tone = rng.uniform(0, len(SKIN) - 1)
    lo = int(tone)
    skin = _color(rng, SKIN[lo] + (SKIN[min(lo + 1, len(SKIN) - 1)] - SKIN[lo]) * (tone - lo), 6)
    shade = tuple(int(c * 0.8) for c in skin)
    hair = _color(rng, HAIR[rng.integers(len(HAIR))], 8)
    style = rng.integers(4)                     # 0 short, 1 long, 2 bald-ish, 3 bun

    # clothes / shoulders
    d.ellipse([cx - 2.1 * w, cy + 0.9 * h, cx + 2.1 * w, cy + 2.6 * h],
              fill=_color(rng, rng.uniform(20, 235, 3), 0))
    d.rectangle([cx - 0.35 * w, cy + 0.6 * h, cx + 0.35 * w, cy + 1.1 * h], fill=shade)  # neck
    if style == 1:
        d.rounded_rectangle([cx - 1.25 * w, cy - 1.1 * h, cx + 1.25 * w, cy + 1.05 * h],
                            radius=w * 0.8, fill=hair)
    elif style == 3:
        d.ellipse([cx - 0.5 * w, cy - 1.55 * h, cx + 0.5 * w, cy - 0.85 * h], fill=hair)
    if style != 2:
        d.ellipse([cx - 1.12 * w, cy - 1.15 * h, cx + 1.12 * w, cy + 0.55 * h], fill=hair)
    # ears, face
    for side in (-1, 1):
        ex = cx + side * w * (1.0 - 0.25 * side * turn)
        d.ellipse([ex - 0.18 * w, cy - 0.15 * h, ex + 0.18 * w, cy + 0.2 * h], fill=shade)
    d.ellipse([cx - w, cy - h, cx + w, cy + h], fill=skin)
    if style != 2:  # fringe
        fringe = rng.uniform(0.45, 0.75)
        d.chord([cx - w, cy - 1.08 * h, cx + w, cy - (1 - 2 * fringe) * h * 0.6],
                180, 360, fill=hair)

    fx = cx + turn * w * 0.6                    # where the features are centred
    eye_y = cy - rng.uniform(0.05, 0.2) * h
    gap = rng.uniform(0.33, 0.48) * w
    eye_w = rng.uniform(0.13, 0.2) * w
    eye_h = eye_w * rng.uniform(0.55, 0.85)
    iris = _color(rng, IRIS[rng.integers(len(IRIS))], 10)
    blink = rng.random() < 0.12
    brow = rng.uniform(-0.15, 0.15)
    for side in (-1, 1):
        ex = fx + side * gap * (1 - 0.3 * side * turn)
        if blink:
            d.line([ex - eye_w, eye_y, ex + eye_w, eye_y], fill=(40, 30, 30), width=max(1, int(2 * u)))
        else:
            d.ellipse([ex - eye_w, eye_y - eye_h, ex + eye_w, eye_y + eye_h], fill=(245, 245, 245))
            r = eye_h * 0.85
            px = ex + turn * eye_w * 0.5
            d.ellipse([px - r, eye_y - r, px + r, eye_y + r], fill=iris)
            d.ellipse([px - r / 2.5, eye_y - r / 2.5, px + r / 2.5, eye_y + r / 2.5], fill=(10, 10, 10))
        by = eye_y - eye_h - 0.09 * h
        d.line([ex - eye_w * 1.1, by + side * brow * eye_w, ex + eye_w * 1.1, by - side * brow * eye_w],
               fill=tuple(int(c * 0.7) for c in hair), width=max(1, int(2.5 * u)))

    nose_y = cy + rng.uniform(0.12, 0.25) * h
    d.line([fx + turn * 4 * u, eye_y + eye_h, fx + turn * 8 * u, nose_y], fill=shade,
           width=max(1, int(2 * u)))
    d.line([fx + turn * 8 * u - 0.1 * w, nose_y, fx + turn * 8 * u + 0.1 * w, nose_y], fill=shade,
           width=max(1, int(2 * u)))

    mouth_y = cy + rng.uniform(0.45, 0.6) * h
    mw = rng.uniform(0.22, 0.38) * w
    mood = rng.uniform(-1, 1)                   # >0 smile, <0 frown
    lips = _color(rng, (170, 70, 70), 15)
    box = [fx - mw, mouth_y - abs(mood) * 0.25 * h, fx + mw, mouth_y + abs(mood) * 0.25 * h]
    if rng.random() < 0.2:                      # open mouth
        d.ellipse([fx - mw * 0.7, mouth_y - 0.06 * h, fx + mw * 0.7, mouth_y + 0.12 * h],
                  fill=(70, 20, 25), outline=lips, width=max(1, int(2 * u)))
    elif abs(mood) < 0.15:
        d.line([fx - mw, mouth_y, fx + mw, mouth_y], fill=lips, width=max(1, int(3 * u)))
    else:
        d.arc(box, 20 if mood > 0 else 200, 160 if mood > 0 else 340, fill=lips, width=max(1, int(3 * u)))

    if rng.random() < 0.2:                      # glasses
        frame = _color(rng, (30, 30, 30), 20)
        for side in (-1, 1):
            ex = fx + side * gap * (1 - 0.3 * side * turn)
            d.ellipse([ex - eye_w * 1.6, eye_y - eye_w * 1.3, ex + eye_w * 1.6, eye_y + eye_w * 1.3],
                      outline=frame, width=max(1, int(2 * u)))
        d.line([fx - gap + eye_w * 1.6, eye_y, fx + gap - eye_w * 1.6, eye_y], fill=frame,
               width=max(1, int(2 * u)))

    tilt = rng.normal(0, 8)                     # roll, in degrees
    img = img.rotate(tilt, resample=Image.BICUBIC, center=(cx, cy), fillcolor=background)
    return img.resize((size, size), Image.LANCZOS)


def ffhq_path(root: str, image_id: int, size: int = 128, nested: bool = True) -> str:
    """Where FFHQ keeps image ``image_id``: ``thumbnails128x128/01000/01234.png`` when nested."""
    folder = "thumbnails128x128" if size == 128 else f"images{size}x{size}"
    name = f"{image_id:05d}.png"
    if nested:
        return os.path.join(root, folder, f"{image_id // 1000 * 1000:05d}", name)
    return os.path.join(root, folder, name)


def write_faces(root: str, count: int, size: int = 128, start: int = 0, nested: bool = True,
                progress: bool = True) -> str:
    """Draw faces ``start .. start+count-1`` into ``root`` in FFHQ's layout; returns the image folder."""
    from tqdm import tqdm

    for image_id in tqdm(range(start, start + count), desc="drawing faces", unit="img",
                         disable=not progress):
        path = ffhq_path(root, image_id, size, nested)
        if os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        draw_face(image_id, size).save(tmp, format="PNG")
        os.replace(tmp, path)
    return os.path.dirname(os.path.dirname(ffhq_path(root, start, size, nested))) if nested \
        else os.path.dirname(ffhq_path(root, start, size, nested))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="root folder (the FFHQ layout goes under it)")
    parser.add_argument("--count", type=int, default=1200)
    parser.add_argument("--start", type=int, default=0, help="first image id")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--flat", action="store_true", help="no folders of 1000")
    args = parser.parse_args(argv)
    print(write_faces(args.out, args.count, args.size, args.start, nested=not args.flat))


if __name__ == "__main__":
    main()
