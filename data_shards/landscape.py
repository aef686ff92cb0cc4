"""Procedural landscapes: the built-in sets of the remote-sensing seeds.

One scene (elevation and moisture noise, a lake or coast, forest, farmland parcels, a town
with two roads through it) is rendered several ways, so every pair is truly paired:
  satellite   textured land cover, hill-shaded          (`cond` of maps, timeseries, sat2ground)
  map         flat cartographic colours, outlined roads (`image` of maps)
  ground      a pinhole view from the tile's centre, looking north: sky, distant hills, the
              tile's own ground in perspective, haze     (`image` of sat2ground)
  growth      the town grown between two dates, and the mask of new built-up pixels (timeseries)
and single land-cover textures serve as classes (terrain-classes).

Like the crater fields, image i's parameters come from its own RNG seeded with (seed, i, set),
in resolution-independent units, and the per-pixel work uses only +, -, *, /, comparisons and
indexing (exactly rounded): the bytes don't depend on the machine's vector width.
"""
from __future__ import annotations

import math
from datetime import date, timedelta
from typing import Iterator

import numpy as np

from .pixels import luma
from .sources import Sample
from .synthetic import value_noise

CLASSES = ("water", "forest", "farmland", "urban", "desert")
WATER, FOREST, FARMLAND, URBAN, DESERT, GRASS, ROAD = range(7)  # land-cover codes

# RGB colours per land-cover code: satellite (before texture and shading) and map.
SATELLITE = np.array([(38, 66, 92), (46, 78, 40), (150, 140, 82), (150, 146, 140), (206, 180, 132),
                      (104, 128, 66), (82, 82, 84)], np.float32)
MAP = np.array([(170, 211, 223), (173, 209, 158), (238, 240, 213), (224, 223, 223), (245, 233, 198),
                (205, 235, 176), (255, 255, 255)], np.float32)
MAP_ROAD_CASING = np.array((232, 146, 72), np.float32)
CROPS = np.array([(150, 140, 82), (112, 132, 60), (176, 156, 104), (92, 112, 52), (168, 168, 92)], np.float32)
SKY_TOP, SKY_HORIZON, HAZE = (np.array(c, np.float32) for c in ((92, 142, 212), (196, 214, 236), (186, 198, 210)))
SETS = {"terrain-classes": 1, "maps": 2, "timeseries": 3, "sat2ground": 4}  # RNG salt per set


def _fbm(rng: np.random.Generator, res: int, octaves=(4, 8, 16, 32), roughness: float = 0.5) -> np.ndarray:
    """(res, res) fractal value noise in [0, 1]; octaves finer than res/2 (except the first) are
    drawn, not used, so the same scene keeps its shape at every resolution."""
    out, total = np.zeros((res, res), np.float32), 0.0
    for o, g in enumerate(octaves):
        grid = rng.random((1, g + 1, g + 1), dtype=np.float32)
        if g <= res // 2 or o == 0:
            amp = np.float32(roughness ** o)
            out += amp * value_noise(grid, res)[0]
            total += float(amp)
    return out / np.float32(total)


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=np.float32) + np.float32(0.5)) / np.float32(res)
    return c[None, :].repeat(res, 0), c[:, None].repeat(res, 1)  # x (east), y (south), in [0, 1]


class Scene:
    """One landscape, drawn from `rng`; renderings at any resolution."""

    def __init__(self, rng: np.random.Generator):
        self.seeds = rng.integers(0, 2**63, 6)  # one noise stream per field
        self.water_level = float(rng.uniform(0.28, 0.40))
        self.forest_level = float(rng.uniform(0.52, 0.60))
        self.town = rng.uniform(0.3, 0.7, 2).astype(np.float32)
        self.radius = float(rng.uniform(0.10, 0.18))
        angles = rng.uniform(0, math.pi, 2)  # scalar trig: vectorised cos/sin may round differently
        self.roads = np.array([(math.cos(a), math.sin(a)) for a in angles], np.float32)
        self.parcels = int(rng.integers(5, 10))  # farmland parcels across the tile
        self.sun = np.array(rng.uniform(-1, 1, 2), np.float32)
        self.horizon = float(rng.uniform(0.40, 0.50))

    def _noise(self, i: int, res: int, **kw) -> np.ndarray:
        return _fbm(np.random.default_rng(self.seeds[i]), res, **kw)

    def cover(self, res: int, growth: float = 1.0) -> np.ndarray:
        """(res, res) land-cover codes; `growth` scales the town's radius."""
        x, y = _grid(res)
        elev, moist, edge = self._noise(0, res), self._noise(1, res), self._noise(2, res, octaves=(8, 16))
        cover = np.full((res, res), GRASS, np.int64)
        cover[moist > self.forest_level] = FOREST
        px, py = np.floor(x * self.parcels), np.floor(y * self.parcels)
        parcel = np.random.default_rng(self.seeds[3]).random((self.parcels + 1, self.parcels + 1))
        farm = (moist < self.forest_level - 0.06) & (parcel[py.astype(np.int64), px.astype(np.int64)] < 0.7)
        cover[farm] = FARMLAND
        dx, dy = x - self.town[0], y - self.town[1]
        r = np.float32(self.radius * growth) * (np.float32(0.8) + np.float32(0.4) * edge)  # ragged edge
        cover[dx * dx + dy * dy < r * r] = URBAN
        cover[self._road_distance(res) < np.float32(0.5 / 64 + 0.5 / res)] = ROAD
        cover[elev < self.water_level] = WATER
        return cover

    def _road_distance(self, res: int) -> np.ndarray:
        x, y = _grid(res)
        dx, dy = x - self.town[0], y - self.town[1]
        return np.minimum(*(np.abs(dx * s - dy * c) for c, s in self.roads))

    def satellite(self, cover: np.ndarray) -> np.ndarray:
        """(res, res, 3) float colours: land cover, crop colours per parcel, town blocks, texture, shade."""
        res = cover.shape[0]
        x, y = _grid(res)
        rgb = SATELLITE[cover]
        crop = np.random.default_rng(self.seeds[4]).integers(0, len(CROPS), (self.parcels + 1,) * 2)
        farm = cover == FARMLAND
        rgb[farm] = CROPS[crop[np.floor(y * self.parcels).astype(np.int64), np.floor(x * self.parcels).astype(np.int64)]][farm]
        blocks = 24  # town blocks across the tile: roofs light, streets dark
        streets = ((x * blocks) % 1 < 0.2) | ((y * blocks) % 1 < 0.2)
        town = cover == URBAN
        rgb[town & ~streets] *= np.float32(1.2)
        rgb[town & streets] *= np.float32(0.6)
        texture = self._noise(5, res, octaves=(16, 32, 64, 128), roughness=0.7)
        rgb *= (np.float32(0.8) + np.float32(0.4) * texture)[:, :, None]
        elev = self._noise(0, res)
        gy, gx = np.gradient(elev * np.float32(res / 8), axis=(0, 1))
        shade = np.float32(1) + np.float32(0.5) * (gx * self.sun[0] + gy * self.sun[1])
        rgb[cover != WATER] *= np.clip(shade, 0.6, 1.4)[cover != WATER][:, None]
        return rgb

    def map(self, cover: np.ndarray) -> np.ndarray:
        """(res, res, 3) float colours: flat fills, roads white with an orange casing."""
        rgb = MAP[cover]
        res = cover.shape[0]
        casing = (self._road_distance(res) < np.float32(0.9 / 64 + 0.5 / res)) & (cover != ROAD) & (cover != WATER)
        rgb[casing] = MAP_ROAD_CASING
        return rgb

    def ground(self, satellite: np.ndarray) -> np.ndarray:
        """(res, res, 3) float colours seen from the tile's centre at eye height, looking north."""
        res = satellite.shape[0]
        x, y = _grid(res)
        h = np.float32(self.horizon)
        sky_t = y / h
        rgb = SKY_TOP + (SKY_HORIZON - SKY_TOP) * np.clip(sky_t, 0, 1)[:, :, None]
        hills = h - np.float32(0.08) * self._noise(0, res, octaves=(4, 8))[res // 2][None, :]  # a ridge line
        rgb[(y >= hills) & (y < h)] = HAZE * np.float32(0.85)
        below = y >= h
        t = (y - h) / np.float32(1 - h)                      # 0 at the horizon, 1 at the bottom row
        dist = np.float32(0.04) / np.maximum(t, np.float32(1e-3))  # pinhole camera over flat ground
        gx = np.float32(0.5) + dist * (x - np.float32(0.5)) * np.float32(1.6)
        gy = np.float32(0.5) - dist
        inside = below & (gx >= 0) & (gx < 1) & (gy >= 0)
        cols = np.clip((gx * res).astype(np.int64), 0, res - 1)
        rows = np.clip((gy * res).astype(np.int64), 0, res - 1)
        haze = np.clip(dist / np.float32(0.5), 0, 1)[:, :, None]
        ground = satellite[rows, cols] * (1 - haze) + HAZE * haze
        rgb[inside] = ground[inside]
        rgb[below & ~inside] = HAZE
        return rgb

    def texture(self, cls: int, res: int) -> np.ndarray:
        """(res, res, 3) float colours of one land-cover class filling the tile."""
        cover = np.full((res, res), cls, np.int64)
        if cls == URBAN:
            cover[self._road_distance(res) < np.float32(0.5 / 64 + 0.5 / res)] = ROAD
        rgb = self.satellite(cover)
        if cls == DESERT:  # dunes: a warped triangle wave across the wind direction
            x, y = _grid(res)
            phase = (x * self.roads[0, 0] + y * self.roads[0, 1]) * np.float32(12) + np.float32(3) * self._noise(1, res)
            ridge = np.abs(phase % 2 - 1)
            rgb *= (np.float32(0.8) + np.float32(0.35) * ridge)[:, :, None]
        if cls == WATER:
            rgb *= (np.float32(0.7) + np.float32(0.6) * self._noise(0, res, octaves=(4, 8)))[:, :, None]
        return rgb


def _pixels(rgb: np.ndarray, channels: int) -> np.ndarray:
    out = (np.clip(rgb, 0, 255) + np.float32(0.5)).astype(np.uint8)
    return luma(out) if channels == 1 else out


def _scenes(name: str, count: int, resolution: int, channels: int, seed: int) -> Iterator[tuple[int, Scene]]:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if resolution < 8 or count < 0 or seed < 0:
        raise ValueError("need resolution >= 8, count >= 0, seed >= 0")
    for i in range(count):
        yield i, Scene(np.random.default_rng([seed, i, SETS[name]]))


def terrain_classes(count: int, resolution: int, channels: int = 3, seed: int = 0) -> Iterator[Sample]:
    """Textures of the land-cover classes `CLASSES`, balanced (image i has class i mod 5)."""
    for i, scene in _scenes("terrain-classes", count, resolution, channels, seed):
        cls = i % len(CLASSES)
        yield Sample(key=f"terrain-{i:06d}", image=_pixels(scene.texture(cls, resolution), channels), cls=cls,
                     meta={"generator": "terrain_classes", "seed": seed, "index": i, "class": CLASSES[cls]})


def map_pairs(count: int, resolution: int, channels: int = 3, seed: int = 0) -> Iterator[Sample]:
    """pix2pix maps: `cond` a satellite tile, `image` the same tile as a map."""
    for i, scene in _scenes("maps", count, resolution, channels, seed):
        cover = scene.cover(resolution)
        yield Sample(key=f"maps-{i:06d}", image=_pixels(scene.map(cover), channels),
                     cond=_pixels(scene.satellite(cover), channels),
                     meta={"generator": "map_pairs", "seed": seed, "index": i})


def growth_series(count: int, resolution: int, channels: int = 3, seed: int = 0) -> Iterator[Sample]:
    """SpaceNet-7 style: `cond` the past tile, `mask` new built-up pixels (255), `image` the future
    tile; `json` has the id and both dates."""
    for i, scene in _scenes("timeseries", count, resolution, channels, seed):
        rng = np.random.default_rng([seed, i, SETS["timeseries"], 1])
        growth = float(rng.uniform(1.25, 1.7))
        past_day = date(2018, 1, 1) + timedelta(days=int(rng.integers(0, 730)))
        future_day = past_day + timedelta(days=int(rng.integers(180, 720)))
        past, future = scene.cover(resolution), scene.cover(resolution, growth)
        mask = ((future == URBAN) & (past != URBAN)).astype(np.uint8)[:, :, None] * np.uint8(255)
        key = f"timeseries-{i:06d}"
        yield Sample(key=key, image=_pixels(scene.satellite(future), channels),
                     cond=_pixels(scene.satellite(past), channels), mask=mask,
                     meta={"generator": "growth_series", "seed": seed, "index": i, "id": key,
                           "past_date": past_day.isoformat(), "future_date": future_day.isoformat()})


def ground_pairs(count: int, resolution: int, channels: int = 3, seed: int = 0) -> Iterator[Sample]:
    """Satellite -> ground view: `cond` a satellite tile, `image` the view from its centre."""
    for i, scene in _scenes("sat2ground", count, resolution, channels, seed):
        satellite = scene.satellite(scene.cover(resolution))
        yield Sample(key=f"sat2ground-{i:06d}", image=_pixels(scene.ground(satellite), channels),
                     cond=_pixels(satellite, channels),
                     meta={"generator": "ground_pairs", "seed": seed, "index": i})
