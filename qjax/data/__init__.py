"""Datasets: verified local files, loaders that never download, JAX batching.

`python -m qjax.data fetch NAME` fills the cache (default
`~/.cache/qjax/datasets`, or `$QJAX_DATA`); `load(NAME)` reads it.
"""

from qjax.data.batching import augment_cifar
from qjax.data.batching import channel_stats
from qjax.data.batching import normalize
from qjax.data.batching import shuffle_batches
from qjax.data.errors import DatasetCorruptError
from qjax.data.errors import DatasetNotFoundError
from qjax.data.fetching import FetchError
from qjax.data.fetching import fetch
from qjax.data.formats import parse_cifar
from qjax.data.formats import read_idx
from qjax.data.loaders import Dataset
from qjax.data.loaders import default_cache_dir
from qjax.data.loaders import load
from qjax.data.registry import KNOWN_NAMES
from qjax.data.tfds_adapter import StreamingDataset
from qjax.data.tfds_adapter import load_tfds
from qjax.data.tfds_adapter import tfds_batches
from qjax.data.tfds_adapter import tfds_stream

__all__ = [
    "augment_cifar",
    "channel_stats",
    "normalize",
    "shuffle_batches",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "FetchError",
    "fetch",
    "parse_cifar",
    "read_idx",
    "Dataset",
    "default_cache_dir",
    "load",
    "KNOWN_NAMES",
    "StreamingDataset",
    "load_tfds",
    "tfds_batches",
    "tfds_stream",
]
