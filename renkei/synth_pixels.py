"""Pixel data for synthetic studies: anatomy-like phantoms that compress like real images.

Real CT, MR and radiographs are smooth regions (air, fat, soft tissue, organs,
bone) with soft edges, slow texture and quantum noise. Pure zeros compress far
too well and pure noise not at all; these phantoms sit where real images do
(zlib ratio about 2-3 for CT), so transfer and storage figures measured on them
mean something.

Everything is vectorised numpy and deterministic: each slice draws its noise
from a generator seeded by (series seed, slice index), so slices can be made in
any order, one at a time (a 300-slice series never sits in memory whole).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

CT_RESCALE_INTERCEPT = -1024
STORED_MAX_12BIT = 4095

CTRegion = Literal["chest", "abdomen", "chest-abdomen-pelvis"]
MRWeighting = Literal["T1", "T2"]
RadiographView = Literal["PA", "LL"]

# Extent along the body axis (mm below the lung apex) each CT exam covers.
CT_REGION_EXTENT_MM: dict[str, tuple[float, float]] = {
    "chest": (0.0, 330.0),
    "abdomen": (250.0, 600.0),
    "chest-abdomen-pelvis": (0.0, 700.0),
}
MR_HEAD_EXTENT_MM = (0.0, 150.0)


def seed_ints(*parts: object) -> list[int]:
    """Four 32-bit words from any parts: a stable numpy seed (same parts, same stream)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def rng_for(*parts: object) -> np.random.Generator:
    return np.random.default_rng(seed_ints(*parts))


@dataclass(frozen=True)
class _Ellipse:
    """A soft-edged ellipse in normalised image coordinates ([-1, 1] across the field of view).

    Along the body axis it is an ellipsoid centred at `zc` with half-length `hz`
    (hz <= 0: a cylinder present at every z).
    """

    cx: float
    cy: float
    a: float
    b: float
    value: float
    zc: float = 0.0
    hz: float = 0.0

    def at(self, z: float) -> tuple[float, float] | None:
        if self.hz <= 0:
            return self.a, self.b
        t = (z - self.zc) / self.hz
        if abs(t) >= 0.97:
            return None
        s = math.sqrt(1.0 - t * t)
        return self.a * s, self.b * s


class _Canvas:
    """A float32 image with painter's-algorithm soft shapes drawn inside their bounding boxes."""

    def __init__(self, rows: int, cols: int, fill: float) -> None:
        self.rows = rows
        self.cols = cols
        self.img = np.full((rows, cols), fill, dtype=np.float32)
        # pixel centres in normalised coordinates
        self.u = (np.arange(cols, dtype=np.float32) + 0.5) / cols * 2.0 - 1.0
        self.v = (np.arange(rows, dtype=np.float32) + 0.5) / rows * 2.0 - 1.0
        self.edge_px = 1.2

    def _box(self, cx: float, cy: float, a: float, b: float) -> tuple[slice, slice] | None:
        c0 = max(0, int((cx - a + 1.0) / 2.0 * self.cols) - 2)
        c1 = min(self.cols, int((cx + a + 1.0) / 2.0 * self.cols) + 3)
        r0 = max(0, int((cy - b + 1.0) / 2.0 * self.rows) - 2)
        r1 = min(self.rows, int((cy + b + 1.0) / 2.0 * self.rows) + 3)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def mask(self, cx: float, cy: float, a: float, b: float) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Soft coverage (0..1) of an ellipse over its bounding box, and the box."""
        if a <= 0 or b <= 0:
            return None
        box = self._box(cx, cy, a, b)
        if box is None:
            return None
        du = (self.u[box[1]] - cx) / a
        dv = (self.v[box[0]] - cy) / b
        d = np.sqrt(dv[:, None] ** 2 + du[None, :] ** 2)
        # edge about `edge_px` pixels wide whatever the ellipse size (partial-volume blur)
        k = min(a * self.cols, b * self.rows) / 2.0 / self.edge_px
        return box, np.clip((1.0 - d) * k + 0.5, 0.0, 1.0)

    def paint(self, cx: float, cy: float, a: float, b: float, value: float) -> None:
        got = self.mask(cx, cy, a, b)
        if got is None:
            return
        box, m = got
        region = self.img[box]
        region += (np.float32(value) - region) * m

    def add(self, cx: float, cy: float, a: float, b: float, delta: float) -> None:
        got = self.mask(cx, cy, a, b)
        if got is None:
            return
        box, m = got
        self.img[box] += np.float32(delta) * m


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights (n_out x n_in) spreading n_in knots over n_out pixels."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) / n_out * (n_in - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    w = np.zeros((n_out, n_in), dtype=np.float32)
    w[np.arange(n_out), lo] = 1.0 - frac
    w[np.arange(n_out), lo + 1] = frac
    return w


class _Texture:
    """A smooth random field in [-1, 1]-ish that varies slowly along z (knots every `dz` mm)."""

    def __init__(self, seed: Sequence[int], rows: int, cols: int, knots: int = 12, dz: float = 40.0) -> None:
        self.seed = list(seed)
        self.knots = knots
        self.dz = dz
        self.wr = _interp_matrix(rows, knots)
        self.wc = _interp_matrix(cols, knots)
        self._cache: dict[int, np.ndarray] = {}

    def _knot(self, k: int) -> np.ndarray:
        """The full-resolution field at knot plane k (cached: slices between two planes blend them)."""
        if k not in self._cache:
            grid = (
                np.random.default_rng(self.seed + [k & 0xFFFFFFFF])
                .standard_normal((self.knots, self.knots))
                .astype(np.float32)
            )
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[k] = self.wr @ grid @ self.wc.T
        return self._cache[k]

    def at(self, z: float) -> np.ndarray:
        pos = z / self.dz
        k = math.floor(pos)
        f = np.float32(pos - k)
        return self._knot(k) * (1 - f) + self._knot(k + 1) * f


class CTPhantom:
    """A chest/abdomen/pelvis CT phantom in HU; `slice(z_mm, index)` returns stored uint16 values.

    Stored value = HU - CT_RESCALE_INTERCEPT (0..4095, 12 bits); outside the
    reconstruction circle the stored value is 0, as scanners pad it.
    """

    def __init__(
        self,
        seed: Sequence[int] | int,
        size: int = 512,
        *,
        contrast: bool = False,
        noise_hu: float = 14.0,
    ) -> None:
        self.seed = list(seed) if not isinstance(seed, int) else seed_ints(seed)
        self.size = size
        self.contrast = contrast
        self.noise_hu = noise_hu
        rng = np.random.default_rng(self.seed + [1])
        # a person's build: small variations of every shape
        self.build = float(rng.uniform(0.92, 1.06))
        self.depth = float(rng.uniform(0.9, 1.08))
        self.vertebra_phase = float(rng.uniform(0, 28))
        self.rib_phase = float(rng.uniform(0, 2 * math.pi))
        self.bowel = [
            (
                float(rng.uniform(-0.45, 0.45)),
                float(rng.uniform(-0.3, 0.15)),
                float(rng.uniform(0.05, 0.11)),
                float(rng.uniform(470, 600)),
                float(rng.uniform(25, 60)),
                bool(rng.random() < 0.4),
            )
            for _ in range(7)
        ]
        self.vessels = [
            (
                float(rng.choice([-1, 1]) * rng.uniform(0.12, 0.48)),
                float(rng.uniform(-0.25, 0.35)),
                float(rng.uniform(0.006, 0.018)),
                float(rng.uniform(30, 90)),
            )
            for _ in range(40)
        ]
        self.texture = _Texture(self.seed + [2], size, size)
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.outside_fov = (c[:, None] ** 2 + c[None, :] ** 2) > 1.0

    def hu(self, z: float) -> np.ndarray:
        """The noiseless HU image at `z` mm below the lung apex."""
        cv = _Canvas(self.size, self.size, -1000.0)
        s, d = self.build, self.depth
        contrast = self.contrast
        # couch under the patient
        cv.paint(0.0, 0.80, 0.85, 0.025, -250.0)
        # trunk: wider at the chest, narrower at the waist, pelvis wide again
        width = 0.74 + 0.05 * math.cos((z - 120) / 260 * math.pi) + (0.05 if z > 560 else 0.0)
        a, b = width * s, 0.50 * s * d
        cy = 0.10
        cv.paint(0.0, cy, a, b, -100.0)  # skin and subcutaneous fat
        cv.paint(0.0, cy, a * 0.93, b * 0.91, 50.0)  # muscle wall
        cv.paint(0.0, cy, a * 0.86, b * 0.82, -70.0 if z > 330 else -40.0)  # visceral / mediastinal fat
        organs = [
            _Ellipse(-0.30 * s, 0.04, 0.22 * s, 0.33 * d, -850.0, 165, 175),  # right lung
            _Ellipse(0.31 * s, 0.04, 0.21 * s, 0.33 * d, -850.0, 160, 170),  # left lung
            _Ellipse(0.07, 0.0, 0.25 * s, 0.21 * d, 150.0 if contrast else 40.0, 215, 80),  # heart
            _Ellipse(-0.28 * s, 0.08, 0.36 * s, 0.33 * d, 110.0 if contrast else 60.0, 370, 115),  # liver
            _Ellipse(0.38 * s, 0.20, 0.12, 0.19, 120.0 if contrast else 48.0, 365, 60),  # spleen
            _Ellipse(0.22 * s, -0.06, 0.17, 0.13, 10.0, 345, 50),  # stomach
            _Ellipse(0.20 * s, -0.12, 0.09, 0.05, -900.0, 335, 22),  # gastric air
            _Ellipse(-0.30 * s, 0.33, 0.09, 0.13, 180.0 if contrast else 35.0, 425, 55),  # right kidney
            _Ellipse(0.30 * s, 0.33, 0.09, 0.13, 180.0 if contrast else 35.0, 415, 55),  # left kidney
            _Ellipse(0.0, -0.02, 0.16, 0.12, 10.0, 645, 40),  # bladder
        ]
        for e in organs:
            axes = e.at(z)
            if axes:
                cv.paint(e.cx, e.cy, axes[0], axes[1], e.value)
        # pulmonary vessels: small soft-tissue dots drifting slowly through the lungs
        if 15 < z < 320:
            for k, (vx, vy, vr, drift) in enumerate(self.vessels):
                x = vx + 0.03 * math.sin(z / drift + k)
                inside = _Ellipse(-0.30 if vx < 0 else 0.31, 0.04, 0.18, 0.28, 0, 163, 160).at(z)
                if inside and ((x - (-0.30 if vx < 0 else 0.31)) / inside[0]) ** 2 + ((vy - 0.04) / inside[1]) ** 2 < 1:
                    cv.paint(x, vy, vr, vr, -30.0)
        for bx, by, br, bz, bh, gas in self.bowel:
            axes = _Ellipse(bx, by, br, br * 0.8, 0, bz, bh).at(z)
            if axes:
                cv.paint(bx, by, axes[0], axes[1], -800.0 if gas else 20.0)
        # aorta, then spine: vertebral bodies and discs alternate every 28 mm
        if 20 < z < 560:
            cv.paint(0.05, 0.24, 0.05, 0.05, 250.0 if contrast else 40.0)
        vert = 0.5 + 0.5 * math.cos(2 * math.pi * (z + self.vertebra_phase) / 28.0)
        body_hu = 80.0 + 170.0 * min(1.0, vert * 1.6)
        cv.paint(0.0, 0.40, 0.085, 0.075, 600.0 if vert > 0.3 else 90.0)  # cortex
        cv.paint(0.0, 0.40, 0.07, 0.062, body_hu)  # cancellous bone or disc
        cv.paint(0.0, 0.52, 0.035, 0.04, 15.0)  # spinal canal
        cv.paint(0.0, 0.58, 0.03, 0.03, 500.0)  # spinous process
        # ribs: cross-sections around the chest wall, drifting with z
        if 10 < z < 320:
            for k in range(14):
                theta = self.rib_phase * 0.1 + (k + 0.5) / 14 * 2 * math.pi + z / 900.0
                if abs(math.sin(theta)) > 0.97 and math.sin(theta) < 0:
                    continue  # sternum gap anteriorly
                rx = math.cos(theta) * a * 0.89
                ry = cy + math.sin(theta) * b * 0.86
                cv.paint(rx, ry, 0.028, 0.022, 700.0)
        # pelvis: iliac bones
        if z > 560:
            for side in (-1, 1):
                cv.paint(side * 0.42 * s, 0.25, 0.22, 0.09, 650.0)
                cv.paint(side * 0.42 * s, 0.25, 0.18, 0.06, 220.0)
        img = cv.img
        # slow tissue texture inside the body (none in air)
        tex = self.texture.at(z)
        img += tex * (np.clip(img + 600.0, 0.0, 600.0) * (10.0 / 600.0))
        return img

    def slice(self, z: float, index: int) -> np.ndarray:
        """Stored values (uint16, 12 bits used) of one slice with scanner noise."""
        img = self.hu(z)
        noise = np.random.default_rng(self.seed + [1000 + index]).standard_normal(img.shape, dtype=np.float32)
        img += noise * np.float32(self.noise_hu)
        img -= CT_RESCALE_INTERCEPT
        np.clip(img, 0, STORED_MAX_12BIT, out=img)
        out = np.rint(img).astype(np.uint16)
        out[self.outside_fov] = 0
        return out


# MR tissue signal for T1 and T2 weighting (arbitrary units, 12-bit range)
_MR_SIGNAL: dict[str, dict[str, float]] = {
    "T1": {"fat": 1500, "skull": 120, "csf": 260, "gm": 900, "wm": 1250, "eye": 300, "muscle": 700},
    "T2": {"fat": 1100, "skull": 90, "csf": 2300, "gm": 1300, "wm": 850, "eye": 2200, "muscle": 500},
}


class MRHeadPhantom:
    """An axial brain MR phantom; `slice(z_mm, index)` returns uint16 magnitude values.

    Background is Rician noise, not zeros, and a smooth bias field shades the
    image, as on a real coil.
    """

    def __init__(
        self, seed: Sequence[int] | int, size: int = 256, weighting: MRWeighting = "T1", noise: float = 12.0
    ) -> None:
        self.seed = list(seed) if not isinstance(seed, int) else seed_ints(seed)
        self.size = size
        self.signal = _MR_SIGNAL[weighting]
        self.noise = noise
        rng = np.random.default_rng(self.seed + [1])
        self.scale = float(rng.uniform(0.93, 1.04))
        self.gyri = [
            (float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.025, 0.06)), float(rng.uniform(0.6, 0.74)))
            for _ in range(30)
        ]
        self.texture = _Texture(self.seed + [2], size, size, knots=16, dz=25.0)
        self.bias = _Texture(self.seed + [3], size, size, knots=4, dz=200.0)

    def magnitude(self, z: float) -> np.ndarray:
        """The noiseless signal at `z` mm below the vertex."""
        sig = self.signal
        s = self.scale
        cv = _Canvas(self.size, self.size, 0.0)
        head = _Ellipse(0.0, 0.02, 0.70 * s, 0.86 * s, 0, 95, 110)
        axes = head.at(z)
        if axes:
            a, b = axes
            cv.paint(0.0, 0.02, a, b, sig["fat"])  # scalp
            cv.paint(0.0, 0.02, a * 0.95, b * 0.96, sig["skull"])
            brain = _Ellipse(0.0, 0.02, 0.62 * s, 0.78 * s, 0, 80, 95).at(z)
            if brain:
                ba, bb = brain
                cv.paint(0.0, 0.02, ba, bb, sig["csf"])
                cv.paint(0.0, 0.02, ba * 0.95, bb * 0.96, sig["gm"])
                cv.paint(0.0, 0.04, ba * 0.72, bb * 0.74, sig["wm"])
                # gyri: small grey-matter indentations into the white matter
                for k, (jitter, radius, depth) in enumerate(self.gyri):
                    th = 2 * math.pi * (k + jitter) / len(self.gyri) + z / 60.0
                    x, y = math.cos(th) * ba * depth, 0.04 + math.sin(th) * bb * depth
                    cv.paint(x, y, radius, radius * 0.8, sig["gm"])
            for side in (-1, 1):
                vent = _Ellipse(side * 0.09, -0.02, 0.05, 0.24, 0, 70, 28).at(z)
                if vent:
                    cv.paint(side * 0.09, -0.02, vent[0], vent[1], sig["csf"])
                eye = _Ellipse(side * 0.30, -0.74, 0.12, 0.12, 0, 128, 16).at(z)
                if eye:
                    cv.paint(side * 0.30, -0.74, eye[0], eye[1], sig["eye"])
            if z > 120:
                for side in (-1, 1):
                    cv.paint(side * 0.45, 0.15, 0.16, 0.25, sig["muscle"])
        img = cv.img
        img *= 1.0 + 0.06 * self.texture.at(z)
        img *= 1.0 + 0.12 * self.bias.at(z)
        return img

    def slice(self, z: float, index: int) -> np.ndarray:
        img = self.magnitude(z)
        rng = np.random.default_rng(self.seed + [1000 + index])
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(self.noise)
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(self.noise)
        mag = np.sqrt((img + n1) ** 2 + n2**2)
        np.clip(mag, 0, STORED_MAX_12BIT, out=mag)
        return np.rint(mag).astype(np.uint16)


def chest_radiograph(seed: Sequence[int] | int, rows: int, cols: int, view: RadiographView = "PA") -> np.ndarray:
    """A chest radiograph (uint16, 12 bits, MONOCHROME2: bone bright, lungs and air dark)."""
    seed = list(seed) if not isinstance(seed, int) else seed_ints(seed)
    rng = np.random.default_rng(seed + [1])
    s = float(rng.uniform(0.92, 1.05))
    cv = _Canvas(rows, cols, 0.0)
    cv.edge_px = 4.0
    u, v = cv.u[None, :], cv.v[:, None]
    if view == "PA":
        # trunk thickness: neck at the top, shoulders, chest
        width = 0.22 + 0.62 * s / (1.0 + np.exp(-(v + 0.60) / 0.05))
        att = np.sqrt(np.clip(1.0 - (u / width) ** 2, 0.0, 1.0)) * 0.55
        for side in (-1, 1):  # arms
            arm = np.clip(1.0 - ((u - side * 0.93) / 0.07) ** 2, 0.0, 1.0)
            att = att + 0.3 * np.sqrt(arm) / (1.0 + np.exp(-(v + 0.5) / 0.04))
        cv.img += att.astype(np.float32)
        for side in (-1, 1):
            cv.add(side * 0.36 * s, 0.0, 0.27 * s, 0.55, -0.30)  # lungs
        cv.add(0.08, 0.28, 0.28 * s, 0.24, 0.22)  # heart
        cv.add(0.0, 0.05, 0.075, 1.2, 0.18)  # spine and mediastinum
        cv.add(0.0, 0.95, 0.9, 0.35, 0.10)  # diaphragm and abdomen
        cv.edge_px = 2.0
        for k in range(10):  # posterior ribs: arcs of small ellipses
            y0 = -0.55 + k * 0.105
            for side in (-1, 1):
                for j in range(28):
                    x = side * (0.08 + j * 0.025) * s
                    y = y0 - 0.05 + 0.5 * (abs(x) - 0.35) ** 2 + 0.03 * j / 28
                    cv.add(x, y, 0.03, 0.014, 0.035)
        for side in (-1, 1):  # clavicles
            for j in range(8):
                cv.add(side * (0.08 + j * 0.06), -0.62 + 0.012 * j, 0.045, 0.02, 0.12)
    else:
        width = 0.18 + 0.55 * s / (1.0 + np.exp(-(v + 0.60) / 0.05))
        att = np.sqrt(np.clip(1.0 - (u / width) ** 2, 0.0, 1.0)) * 0.75
        cv.img += att.astype(np.float32)
        cv.add(0.0, 0.0, 0.42 * s, 0.55, -0.30)  # lungs superimposed
        cv.add(-0.15, 0.28, 0.25, 0.24, 0.2)  # heart, anterior
        cv.add(0.45 * s, 0.1, 0.09, 1.1, 0.35)  # spine, posterior
        cv.add(0.0, 0.95, 0.9, 0.35, 0.12)
    img = cv.img
    img += 0.015 * _Texture(seed + [2], rows, cols, knots=24).at(0.0)
    signal = 180.0 + 3300.0 * np.clip(img, 0.0, 1.15)
    noise = np.random.default_rng(seed + [3]).standard_normal(signal.shape, dtype=np.float32)
    signal += noise * np.float32(8.0)
    np.clip(signal, 0, STORED_MAX_12BIT, out=signal)
    return np.rint(signal).astype(np.uint16)
