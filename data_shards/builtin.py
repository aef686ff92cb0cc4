"""Built-in data sets named by URLs such as `builtin:craters?count=512&seed=0`.

    builtin:craters          image: crater fields (the probe-image seeds)
    builtin:craters-large    image: a few large craters under one sun (the quickstart's)
    builtin:terrain-classes  image, cls: land-cover textures; class names in the card
    builtin:maps             cond: satellite tile, image: its map (pix2pix)
    builtin:timeseries       cond: past tile, mask: new built-up area, image: future tile, json: id, dates
    builtin:sat2ground       cond: satellite tile, image: the ground-level view from its centre

Each takes `count` and `seed`, renders at the spec's resolution with 1 or 3 channels (pairs:
both images; masks have 1), and is generated, so every machine builds the same set (same bytes,
same fingerprint) without any download: the embedded default, spec overrides and tests use them.
"""
from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from urllib.parse import parse_qsl, urlsplit

from .errors import UserError
from .card import read_card
from .landscape import CLASSES, ground_pairs, growth_series, map_pairs, terrain_classes
from .storage import filesystem, join, to_url
from .synthetic import LARGE, crater_field
from .writer import write_shards

# name -> (generator(count, resolution, channels, seed), query parameters with defaults)
BUILTINS = {
    "craters": (crater_field, {"count": 512, "seed": 0}),              # image (StyleGAN / folder sets)
    "craters-large": (partial(crater_field, style=LARGE), {"count": 512, "seed": 0}),  # image, learnt fast
    "terrain-classes": (terrain_classes, {"count": 500, "seed": 0}),   # image, cls (class folders)
    "maps": (map_pairs, {"count": 256, "seed": 0}),                    # cond satellite, image map (pix2pix)
    "timeseries": (growth_series, {"count": 256, "seed": 0}),          # cond past, mask growth, image future, json
    "sat2ground": (ground_pairs, {"count": 256, "seed": 0}),           # cond satellite, image ground view
}
CLASS_NAMES = {"terrain-classes": list(CLASSES)}
# The set to train on when a spec's data is not built in, by the keys its family's batches carry.
_FOR_KEYS = {("image",): "craters", ("image", "cls"): "terrain-classes", ("cond", "image"): "maps",
             ("cond", "mask", "image"): "timeseries"}


def _allowed() -> str:
    return ", ".join(f"builtin:{name}?" + "&".join(f"{k}={v}" for k, v in params.items())
                     for name, (_, params) in BUILTINS.items())


def builtin_for_keys(keys: Iterable[str]) -> str:
    """The built-in set whose samples carry `keys` (a family's `data_keys`, in order), e.g.
    ("cond", "image") -> "maps"; KeyError when none does."""
    keys = tuple(keys)
    if keys not in _FOR_KEYS:
        raise KeyError(f"no built-in data set carries {keys}; set data.train")
    return _FOR_KEYS[keys]


def is_builtin(url: str) -> bool:
    return str(url).startswith("builtin:")


def parse_builtin(url: str) -> tuple[str, dict[str, int]]:
    parts = urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme != "builtin" or name not in BUILTINS:
        raise UserError(f"unknown built-in data set {url!r}; allowed: {_allowed()}")
    params = dict(BUILTINS[name][1])
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in params:
            raise UserError(f"{url!r}: unknown parameter {k!r}; allowed: {_allowed()}")
        try:
            params[k] = int(v)
        except ValueError:
            raise UserError(f"{url!r}: {k}={v!r} is not an integer; allowed: {_allowed()}") from None
        if params[k] < (1 if k == "count" else 0):
            raise UserError(f"{url!r}: {k}={v} out of range; allowed: {_allowed()}")
    return name, params


def ensure_builtin(url: str, root: str, resolution: int, channels: int, shard_samples: int = 128) -> str:
    """Build the set once under `root` and return its `file://` (or other fsspec) URL."""
    name, params = parse_builtin(url)
    if channels not in (1, 3):
        raise UserError(f"{url}: built-in sets have 1 or 3 channels, not {channels}")
    dest = join(to_url(root), f"{name}-n{params['count']}-s{params['seed']}-r{resolution}-c{channels}")
    fs, path = filesystem(dest)
    if fs.exists(join(path, "manifest.parquet")):
        card = read_card(dest)
        if (card.resolution, card.channels, card.count) == (resolution, channels, params["count"]):
            return dest
    generate = BUILTINS[name][0]
    write_shards(generate(params["count"], resolution, channels, params["seed"]), dest,
                 layout=f"synthetic:{name}", resolution=resolution, channels=channels, source=url,
                 shard_samples=shard_samples, classes=CLASS_NAMES.get(name), progress=False)
    return dest
