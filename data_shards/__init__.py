"""The data plane: sources -> WebDataset tar shards in object storage (any fsspec URL) -> streams.

    sources / synthetic   iterators of `Sample`s (image folders, procedural crater fields)
    writer                samples -> shard-NNNNNN.tar + dataset.json + manifest.parquet
    card                  reading dataset.json and manifest.parquet
    stream                shards -> batches of uint8 tensors (training stream, one ordered pass)
    builtin               `builtin:craters?count=...` sets, generated on demand
    preview               text description and image grids
    storage               fsspec URLs, S3 settings, webdataset's s3:// opener

Nothing here imports `jobs`, `models` or `search`; torch (via webdataset) loads only when
shards are written or streamed, so `import data_shards` stays light.
"""
from .builtin import ensure_builtin, is_builtin
from .card import DatasetCard, read_card, read_manifest
from .sources import Sample, read_folder
from .storage import filesystem, join, register_webdataset_schemes, to_url
from .synthetic import crater_field
from .writer import write_shards

__all__ = [
    "DatasetCard", "Sample", "crater_field", "ensure_builtin", "filesystem", "is_builtin", "join",
    "read_card", "read_folder", "read_manifest", "register_webdataset_schemes", "to_url", "write_shards",
]
