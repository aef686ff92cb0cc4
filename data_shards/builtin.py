"""Built-in data sets named by URLs such as `builtin:craters?count=512&seed=0`.

They are generated, so every machine can build the same set (same bytes, same fingerprint)
without any download: the embedded default and the tests train on them.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from .card import read_card
from .storage import filesystem, join, to_url
from .synthetic import crater_field
from .writer import write_shards

# name -> (generator, query parameters with defaults)
BUILTINS = {"craters": (crater_field, {"count": 512, "seed": 0})}


def _allowed() -> str:
    return ", ".join(f"builtin:{name}?" + "&".join(f"{k}={v}" for k, v in params.items())
                     for name, (_, params) in BUILTINS.items())


def is_builtin(url: str) -> bool:
    return str(url).startswith("builtin:")


def parse_builtin(url: str) -> tuple[str, dict[str, int]]:
    parts = urlsplit(url)
    name = parts.path.strip("/")
    if parts.scheme != "builtin" or name not in BUILTINS:
        raise ValueError(f"unknown built-in data set {url!r}; allowed: {_allowed()}")
    params = dict(BUILTINS[name][1])
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k not in params:
            raise ValueError(f"{url!r}: unknown parameter {k!r}; allowed: {_allowed()}")
        try:
            params[k] = int(v)
        except ValueError:
            raise ValueError(f"{url!r}: {k}={v!r} is not an integer; allowed: {_allowed()}") from None
        if params[k] < (1 if k == "count" else 0):
            raise ValueError(f"{url!r}: {k}={v} out of range")
    return name, params


def ensure_builtin(url: str, root: str, resolution: int, channels: int, shard_samples: int = 128) -> str:
    """Build the set once under `root` and return its `file://` (or other fsspec) URL."""
    name, params = parse_builtin(url)
    dest = join(to_url(root), f"{name}-n{params['count']}-s{params['seed']}-r{resolution}-c{channels}")
    fs, path = filesystem(dest)
    if fs.exists(join(path, "manifest.parquet")):
        card = read_card(dest)
        if (card.resolution, card.channels, card.count) == (resolution, channels, params["count"]):
            return dest
    generate = BUILTINS[name][0]
    write_shards(generate(params["count"], resolution, channels, params["seed"]), dest,
                 layout=f"synthetic:{name}", resolution=resolution, channels=channels, source=url,
                 shard_samples=shard_samples, progress=False)
    return dest
