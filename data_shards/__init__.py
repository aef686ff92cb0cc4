"""The data plane: sources -> WebDataset tar shards in object storage (any fsspec URL) -> streams.

    build              `orbitgen data build`: a layout's reader -> checked samples -> writer
    sources, source_*  the layouts: folder, class-folders, side-by-side, paired-folders (sources),
                       stylegan-zip, timeseries-csv, geotiff; they yield Samples and Skipped items
    sample_keys        users' file names -> valid sample keys (camera names, spaces, accents)
    image_header       an image's size and bands from its header, checked before any decode
    pixels             (H, W, C) uint8 arrays: channel policies, centre crop + resize
    synthetic, landscape  built-in generated sets (crater fields; satellite/map/ground/growth scenes)
    builtin            `builtin:NAME?count=...&seed=...` sets, generated on demand
    writer             samples -> shard-NNNNNN.tar + dataset.json (+ skipped.jsonl) + manifest.parquet
    card               reading dataset.json and manifest.parquet
    shard_reader       a shard's raw samples: prefetch, retries, damage as placeholders
    tar_reader         the files of a tar stream, without tarfile's per-member cost; every header
                       distrusted (DamagedShard names shard and member)
    threads            an ordered thread map (builds decode and encode on every core)
    decode             raw sample -> arrays
    stream             shards -> batches of uint8 tensors (resumable training stream, ordered pass)
    verify, preview    checking a set against its manifest; text description and image grids
    storage            fsspec URLs, S3 settings, webdataset's s3:// opener

Nothing here imports `jobs`, `models` or `search`; torch loads only when shards are written or
streamed, tifffile only when TIFFs are read, so `import data_shards` stays light.
"""
from .builtin import BUILTINS, ensure_builtin, is_builtin
from .card import DatasetCard, read_card, read_manifest
from .sources import Sample, Skipped, read_folder
from .storage import filesystem, join, register_webdataset_schemes, to_url
from .synthetic import crater_field
from .writer import write_shards

__all__ = [
    "BUILTINS", "DatasetCard", "Sample", "Skipped", "crater_field", "ensure_builtin", "filesystem", "is_builtin",
    "join", "read_card", "read_folder", "read_manifest", "register_webdataset_schemes", "to_url", "write_shards",
]
