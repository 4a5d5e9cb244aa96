"""The embedded suite: small image-to-image tasks generated procedurally, offline, in seconds.

Every kind draws a random scene and renders it twice, as A and as B, where B is a deterministic and local
function of A (colour remaps, outlines, frames and shadows): a small generator learns it in minutes on a
CPU, and because the scene is known the test splits keep the true A -> B correspondence, so unpaired
kinds can be scored against ground truth too. Paired kinds are written like the pix2pix archives
(``train/ test/``, A|B side by side); unpaired ones like the CycleGAN archives (``trainA/ trainB/ testA/
testB/``, A and B of *different* scenes) plus ``testA_truth/`` (true B of each testA file) and
``testB_truth/`` (true A of each testB file). Image i of a split depends only on (seed, kind, split, i).
"""
from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from piggyback.fsutil import atomic_directory

Pair = tuple[np.ndarray, np.ndarray]  # (A, B), each uint8 (size, size, 3)


# ---------------------------------------------------------------------------------------------------------
# Geometry: masks over pixel centres, coordinates in [0, 1] so scenes scale with `size`.

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    X, Y = np.meshgrid(c, c)  # (size, size) each; X is the column coordinate
    return X, Y


def _rotate(X, Y, cx, cy, theta):
    dx, dy = X - cx, Y - cy
    return dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)


def _ellipse(X, Y, cx, cy, rx, ry, theta=0.0):
    u, v = _rotate(X, Y, cx, cy, theta)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _box(X, Y, cx, cy, hw, hh, theta=0.0):
    u, v = _rotate(X, Y, cx, cy, theta)
    return (np.abs(u) <= hw) & (np.abs(v) <= hh)


def _triangle(X, Y, pts):
    (x0, y0), (x1, y1), (x2, y2) = pts
    orient = np.sign((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)) or 1.0
    inside = np.ones_like(X, dtype=bool)
    for (ax, ay), (bx, by) in [((x0, y0), (x1, y1)), ((x1, y1), (x2, y2)), ((x2, y2), (x0, y0))]:
        inside &= orient * ((bx - ax) * (Y - ay) - (by - ay) * (X - ax)) >= 0
    return inside


def _near(labels: np.ndarray, r: int, where: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Pixels with a pixel satisfying `where` within Chebyshev distance r (edge-replicated borders)."""
    hit = where(labels)
    pad = np.pad(hit, r, mode="edge")
    out = np.zeros_like(hit)
    n = labels.shape[0]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= pad[r + dy:r + dy + n, r + dx:r + dx + n]
    return out


def _hsv(h, s, v) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Kind "edges" (paired, like edges2shoes read backwards): flat shapes -> their outlines.

def _edges(rng: np.random.Generator, size: int) -> Pair:
    X, Y = _grid(size)
    labels = np.zeros((size, size), dtype=np.int64)
    colours = [_hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.65, 0.95))]  # background
    for k in range(1, int(rng.integers(2, 6)) + 1):
        for _ in range(20):  # keep every colour well apart from the others, so each outline is visible in A
            c = _hsv(rng.random(), rng.uniform(0.55, 1.0), rng.uniform(0.35, 1.0))
            if min(np.abs(c - o).sum() for o in colours) > 120:
                break
        colours.append(c)
        cx, cy = rng.uniform(0.2, 0.8, size=2)
        r1, r2 = rng.uniform(0.1, 0.3, size=2)
        theta = rng.uniform(0, np.pi)
        shape = rng.integers(3)
        if shape == 0:
            mask = _ellipse(X, Y, cx, cy, r1, r2, theta)
        elif shape == 1:
            mask = _box(X, Y, cx, cy, r1 * 0.8, r2 * 0.8, theta)
        else:
            angles = theta + np.array([0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, size=3)
            mask = _triangle(X, Y, [(cx + r1 * np.cos(a), cy + r1 * np.sin(a)) for a in angles])
        labels[mask] = k
    A = _u8(np.stack(colours)[labels])
    r = max(1, round(size / 64))
    edge = np.zeros((size, size), dtype=bool)
    for dy, dx in [(0, 1), (1, 0)]:  # both pixels on either side of a label change: 2-pixel lines
        diff = np.zeros((size, size), dtype=bool)
        d = labels[dy:, dx:] != labels[:size - dy, :size - dx]
        diff[dy:, dx:] |= d
        diff[:size - dy, :size - dx] |= d
        edge |= diff
    if r > 1:  # thicker lines for larger images: about 2r pixels
        edge = _near(edge, r - 1, lambda M: M)
    B = np.full((size, size, 3), 250, dtype=np.uint8)
    B[edge] = (30, 30, 30)
    return A, B


# ---------------------------------------------------------------------------------------------------------
# Kind "facades" (paired, like CMP facades): label map -> rendered facade with materials, frames, shadows.

SKY, WALL, ROOF, WINDOW, DOOR, CORNICE, BALCONY = range(7)
FACADE_LABEL_COLOURS = np.array([(20, 20, 90), (0, 60, 255), (140, 0, 140), (255, 140, 0),
                                 (220, 0, 0), (0, 220, 220), (200, 220, 0)], dtype=np.float64)
FACADE_MATERIALS = np.array([(165, 205, 240), (214, 190, 158), (125, 58, 46), (44, 64, 96),
                             (108, 68, 36), (236, 232, 224), (72, 72, 78)], dtype=np.float64)


def _facades(rng: np.random.Generator, size: int) -> Pair:
    X, Y = _grid(size)
    L = np.full((size, size), WALL, dtype=np.int64)
    top = rng.uniform(0.0, 0.22)
    left, right = (rng.uniform(0.0, 0.15, size=2) if rng.random() < 0.5 else (0.0, 0.0))
    inside = (X >= left) & (X <= 1 - right)
    L[(Y < top) | ~inside] = SKY
    roof = rng.uniform(0.03, 0.08)
    L[(Y >= top) & (Y < top + roof) & inside] = ROOF
    floors, cols = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    fh, cw = (1.0 - top - roof) / floors, (1 - right - left) / cols
    win_w, win_h = rng.uniform(0.35, 0.65) * cw, rng.uniform(0.4, 0.6) * fh
    cornice, balcony = rng.random() < 0.6, rng.random() < 0.4
    door_col = int(rng.integers(cols))
    for f in range(floors):
        y0 = top + roof + f * fh
        if cornice and f > 0:
            L[(Y >= y0) & (Y < y0 + 0.03) & inside] = CORNICE
        for c in range(cols):
            cx = left + (c + 0.5) * cw
            if f == floors - 1 and c == door_col:  # ground floor: a door instead of one window
                L[_box(X, Y, cx, 1.0 - 0.35 * fh, win_w / 2, 0.35 * fh)] = DOOR
                continue
            cy = y0 + 0.5 * fh
            L[_box(X, Y, cx, cy, win_w / 2, win_h / 2)] = WINDOW
            if balcony and f > 0:
                L[_box(X, Y, cx, cy + win_h / 2 + 0.02, win_w / 2 + 0.02, 0.02)] = BALCONY
    A = _u8(FACADE_LABEL_COLOURS[L])
    r = max(1, round(size / 64))
    B = FACADE_MATERIALS[L]
    # Window and door frames: the outer r pixels of each opening.
    for cls, frame in [(WINDOW, (242, 242, 236)), (DOOR, (64, 38, 20))]:
        B[(L == cls) & _near(L, r, lambda M, cls=cls: M != cls)] = frame
    # Shadows cast downwards on the wall by openings, cornices and balconies (light from above).
    caster = np.isin(L, [WINDOW, DOOR, CORNICE, BALCONY])
    shade = np.zeros_like(caster)
    for k in range(1, 2 * r + 1):
        shade[k:] |= caster[:-k]
    B[shade & (L == WALL)] *= 0.72
    return A, _u8(B)


# ---------------------------------------------------------------------------------------------------------
# Kind "daynight" (unpaired, like night2day): a landscape by day -> the same scene at night.

WINDOW_DAY, SUN = np.array((70.0, 80.0, 100.0)), np.array((255.0, 226.0, 70.0))
NIGHT_GAIN, NIGHT_OFFSET = np.array((0.30, 0.34, 0.55)), np.array((8.0, 12.0, 40.0))
WINDOW_NIGHT, MOON = (255, 214, 96), (228, 228, 244)


def _daynight(rng: np.random.Generator, size: int) -> Pair:
    X, Y = _grid(size)
    horizon = rng.uniform(0.45, 0.7)
    top = np.array([rng.uniform(60, 110), rng.uniform(120, 170), rng.uniform(200, 245)])
    low = np.array([rng.uniform(170, 215), rng.uniform(195, 230), rng.uniform(225, 252)])
    t = np.clip(Y / horizon, 0, 1)[..., None]
    img = top * (1 - t) + low * t  # sky gradient
    special = np.zeros((size, size), dtype=np.int64)  # 1 = lit window at night, 2 = sun -> moon
    if rng.random() < 0.6:
        sun = _ellipse(X, Y, rng.uniform(0.1, 0.9), rng.uniform(0.1, horizon - 0.15), 0.07, 0.07)
        img[sun], special[sun] = SUN, 2
    for layer in range(int(rng.integers(1, 3))):  # hills, the far ones bluer
        amp, freq, phase = rng.uniform(0.05, 0.15), rng.uniform(0.8, 2.5), rng.uniform(0, 2 * np.pi)
        ridge = horizon - amp * (0.6 + 0.4 * np.sin(2 * np.pi * freq * X + phase)) + 0.04 * layer
        hill = (Y >= ridge) & (Y < horizon)
        img[hill] = (rng.uniform(60, 110), rng.uniform(110 + 20 * layer, 150 + 20 * layer), rng.uniform(90, 140))
        special[hill] = 0
    ground = np.array([rng.uniform(60, 110), rng.uniform(120, 165), rng.uniform(35, 80)])
    g = ((Y - horizon) / (1 - horizon))[..., None]
    img = np.where((Y >= horizon)[..., None], ground * (1 - 0.35 * g), img)
    special[Y >= horizon] = 0
    for _ in range(int(rng.integers(0, 4))):  # trees: trunk and crown
        tx, base = rng.uniform(0.05, 0.95), rng.uniform(horizon + 0.05, 0.98)
        h = rng.uniform(0.12, 0.25)
        img[_box(X, Y, tx, base - h / 2, 0.015, h / 2)] = (95, 62, 32)
        img[_ellipse(X, Y, tx, base - h, rng.uniform(0.05, 0.09), rng.uniform(0.06, 0.1))] = (
            rng.uniform(25, 60), rng.uniform(95, 140), rng.uniform(25, 60))
    for _ in range(int(rng.integers(1, 4))):  # houses: wall, roof, windows
        hx, base = rng.uniform(0.12, 0.88), rng.uniform(horizon + 0.08, 0.97)
        w, h = rng.uniform(0.1, 0.16), rng.uniform(0.1, 0.18)
        wall = _box(X, Y, hx, base - h / 2, w, h / 2)
        img[wall], special[wall] = (rng.uniform(185, 240), rng.uniform(125, 200), rng.uniform(80, 160)), 0
        roof = _triangle(X, Y, [(hx - w - 0.02, base - h), (hx + w + 0.02, base - h), (hx, base - h - 0.1)])
        img[roof], special[roof] = (rng.uniform(110, 170), rng.uniform(30, 60), rng.uniform(25, 50)), 0
        for wx in (hx - w / 2, hx + w / 2):
            win = _box(X, Y, wx, base - 0.6 * h, 0.03, 0.03)
            img[win], special[win] = WINDOW_DAY, 1
    A = _u8(img)
    B = A.astype(np.float64) * NIGHT_GAIN + NIGHT_OFFSET  # darker, bluer; a function of A's pixels
    B[special == 1], B[special == 2] = WINDOW_NIGHT, MOON
    return A, _u8(B)


# ---------------------------------------------------------------------------------------------------------
# Kind "thermal" (unpaired): a grey-level heat field -> false colour.

THERMAL_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
THERMAL_COLOURS = np.array([(12, 4, 36), (92, 20, 118), (200, 52, 72), (248, 148, 24), (255, 248, 184)], float)


def _thermal(rng: np.random.Generator, size: int) -> Pair:
    X, Y = _grid(size)
    field = np.full((size, size), rng.uniform(0.1, 0.4))
    for _ in range(int(rng.integers(4, 10))):  # warm and cold blobs
        cx, cy, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.06, 0.25)
        field += rng.uniform(-0.35, 0.55) * np.exp(-((X - cx) ** 2 + (Y - cy) ** 2) / (2 * s * s))
    for _ in range(int(rng.integers(0, 4))):  # hot machines with sharp borders
        field[_box(X, Y, *rng.uniform(0.15, 0.85, size=2), *rng.uniform(0.04, 0.12, size=2),
                   rng.uniform(0, np.pi))] = rng.uniform(0.8, 1.0)
    grey = _u8(np.clip(field, 0, 1) * 255)
    t = grey.astype(np.float64) / 255.0
    B = np.stack([np.interp(t, THERMAL_STOPS, THERMAL_COLOURS[:, c]) for c in range(3)], axis=-1)
    return np.repeat(grey[..., None], 3, axis=-1), _u8(B)


# ---------------------------------------------------------------------------------------------------------
# The suite.

@dataclass(frozen=True)
class EmbeddedKind:
    layout: str                                       # "paired" | "unpaired"
    description: str                                  # one line for humans (params.yaml, README)
    render: Callable[[np.random.Generator, int], Pair]


KINDS: dict[str, EmbeddedKind] = {
    "edges": EmbeddedKind("paired", "paired: flat-coloured shapes (A) -> their outlines, dark on white (B)", _edges),
    "facades": EmbeddedKind("paired", "paired: facade label map (A) -> rendered facade with frames and shadows (B)",
                            _facades),
    "daynight": EmbeddedKind("unpaired", "unpaired: landscape by day (A) -> the same scene at night, windows lit (B)",
                             _daynight),
    "thermal": EmbeddedKind("unpaired", "unpaired: grey-level heat field (A) -> false-colour heat map (B)", _thermal),
}
EMBEDDED_KINDS: dict[str, str] = {name: k.description for name, k in KINDS.items()}
# Split codes enter the seed: A and B training scenes of unpaired kinds come from different draws.
_SPLIT_CODES = {"train": 0, "test": 1, "trainA": 2, "trainB": 3, "testA": 4, "testB": 5}


def render_pair(kind: str, seed: int, split: str, index: int, size: int = 64) -> Pair:
    """The (A, B) images of one scene; depends only on (seed, kind, split, index, size)."""
    if kind not in KINDS:
        raise KeyError(f"unknown embedded kind {kind!r} (known: {', '.join(KINDS)})")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(kind.encode()), _SPLIT_CODES[split], index])
    return KINDS[kind].render(rng, size)


def _save_png(path: Path, img: np.ndarray) -> None:
    # Fixed encoder settings and no metadata: the same pixels always give the same bytes.
    Image.fromarray(img, "RGB").save(path, format="PNG", compress_level=6)


def _preview(pairs: list[Pair], size: int) -> np.ndarray:
    """Two rows (A above B) of up to 8 test pairs, upscaled to at least 96 pixels per tile, 2-pixel gaps."""
    zoom = max(1, -(-96 // size))
    tile, gap = size * zoom, 2
    grid = np.full((2 * tile + 3 * gap, len(pairs) * (tile + gap) + gap, 3), 255, dtype=np.uint8)
    for i, pair in enumerate(pairs):
        for row, img in enumerate(pair):
            y, x = gap + row * (tile + gap), gap + i * (tile + gap)
            grid[y:y + tile, x:x + tile] = img.repeat(zoom, 0).repeat(zoom, 1)
    return grid


def generate(kind: str, dest: str | Path, seed: int = 0, size: int = 64, n_train: int = 200, n_test: int = 50,
             overwrite: bool = True) -> dict:
    """Write the raw dataset of one embedded kind to `dest` (atomically) and return its description.

    Paired kinds: ``train/ test/`` with A|B side by side (``0000.png`` ...). Unpaired kinds: ``trainA/ trainB/
    testA/ testB/ testA_truth/ testB_truth/``. Also ``preview.png`` (A above B for a few test scenes) and
    ``embedded.json``. The bytes depend only on the arguments.
    """
    if kind not in KINDS:
        raise KeyError(f"unknown embedded kind {kind!r} (known: {', '.join(KINDS)})")
    spec = KINDS[kind]
    info = {"kind": kind, "description": spec.description, "layout": spec.layout, "seed": seed, "size": size,
            "n_train": n_train, "n_test": n_test, "truth": True}
    previews: list[Pair] = []
    with atomic_directory(dest, overwrite=overwrite) as tmp:
        if spec.layout == "paired":
            for split, n in [("train", n_train), ("test", n_test)]:
                (tmp / split).mkdir()
                for i in range(n):
                    A, B = render_pair(kind, seed, split, i, size)
                    _save_png(tmp / split / f"{i:04d}.png", np.concatenate([A, B], axis=1))  # A left
                    if split == "test" and i < 8:
                        previews.append((A, B))
        else:
            for split, n in [("trainA", n_train), ("trainB", n_train), ("testA", n_test), ("testB", n_test)]:
                keep = 0 if split.endswith("A") else 1  # an A-domain split shows A, a B-domain split shows B
                (tmp / split).mkdir()
                if split.startswith("test"):
                    (tmp / f"{split}_truth").mkdir()
                for i in range(n):
                    pair = render_pair(kind, seed, split, i, size)
                    _save_png(tmp / split / f"{i:04d}.png", pair[keep])
                    if split.startswith("test"):
                        _save_png(tmp / f"{split}_truth" / f"{i:04d}.png", pair[1 - keep])
                    if split == "testA" and i < 8:
                        previews.append(pair)
        if previews:
            _save_png(tmp / "preview.png", _preview(previews, size))
        (tmp / "embedded.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


generate_embedded = generate  # the name re-exported by piggyback.data
