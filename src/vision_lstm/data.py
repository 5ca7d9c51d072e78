"""Datasets in their original file formats: MNIST / Fashion-MNIST (IDX, gzip) and CIFAR-10 (python-version pickles).

Files are looked up in ``data_dir`` (layout as ``mnist/``, ``fashion-mnist/``, ``cifar-10-batches-py/``); missing files
are downloaded from the official sources (or ``$VIL_DATA_MIRROR``), checked against checksums of their *content*
before use, and written atomically. Each split is decoded once into a uint8 tensor; augmentation runs batched on
tensors.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import VilError

MAX_IDX_BYTES = 256 * 2**20  # no IDX file we read is larger; caps decompression (gzip bombs)
MAX_PICKLE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Resource:
    """One file of a dataset: its name under the dataset folder and how to check it."""

    filename: str
    content_md5: str  # md5 of the decompressed IDX bytes / sha256 of CIFAR pixels+labels ("content_sha256")
    content_kind: str = "idx"  # "idx" or "cifar"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    folder: str
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    train_files: tuple[Resource, ...]
    test_files: tuple[Resource, ...]
    mean: tuple[float, ...]  # per channel, of the training set on the [0, 1] scale
    std: tuple[float, ...]
    urls: tuple[str, ...]  # base URLs (IDX: base + filename) or archive URLs
    archive: str | None = None  # archive file name for datasets shipped as one archive
    archive_md5: str | None = None
    archive_member_prefix: str = ""
    augment: tuple[str, ...] = field(default=())

    @property
    def files(self) -> tuple[Resource, ...]:
        return self.train_files + self.test_files


def _idx(name: str, md5: str) -> Resource:
    return Resource(name, md5, "idx")


def _cifar(name: str, sha256: str) -> Resource:
    return Resource(name, sha256, "cifar")


MNIST = DatasetSpec(
    name="mnist", folder="mnist", classes=tuple(str(i) for i in range(10)), image_shape=(1, 28, 28),
    train_files=(_idx("train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb"),
                 _idx("train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624")),
    test_files=(_idx("t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea"),
                _idx("t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637")),
    mean=(0.1307,), std=(0.3081,),
    urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
    augment=("translate",),
)

FASHION_MNIST = DatasetSpec(
    name="fashion-mnist", folder="fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"),
    image_shape=(1, 28, 28),
    train_files=(_idx("train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
                 _idx("train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9")),
    test_files=(_idx("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a"),
                _idx("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965")),
    mean=(0.2860,), std=(0.3530,),
    urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    augment=("translate", "hflip"),
)

CIFAR10 = DatasetSpec(
    name="cifar10", folder="cifar-10-batches-py",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    image_shape=(3, 32, 32),
    # sha256 over the pixel bytes (uint8, N x 3072) followed by the labels (uint8): the content, not the pickle.
    train_files=tuple(_cifar(f"data_batch_{i}", h) for i, h in enumerate((
        "ba52cb2d72c412975d7556bb26bd094956f1c002d1937053f6f1252f2ac17114",
        "350ff9000489d02f2568c0dcf4912ffdbae9e50932147905fb1b8159ad54f0ac",
        "a2b8653fc457df407af6c38b7e0d1a12530f3b5f81fce9f81516efd065daf722",
        "133e6292c377755074c305db8a684d48d5397372cb0aba34f52b4335eab35d97",
        "eb08cdc11fd1267ef871cf4790f193684b3f556d13317be68f4eb374a078ea87"), start=1)),
    test_files=(_cifar("test_batch", "9a4c74f5c8b6f2c4e13d3a1dfb43a5a8cda8a9da515e99fd620d2013a1a6287a"),),
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    archive="cifar-10-python.tar.gz", archive_md5="c58f30108f718f92721af3b95e74349a",
    archive_member_prefix="cifar-10-batches-py/",
    augment=("crop", "hflip"),
)

DATASETS: dict[str, DatasetSpec] = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10}
ALIASES = {"cifar": "cifar10", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}


def dataset_names() -> list[str]:
    return sorted(DATASETS) + sorted(ALIASES)


def get_spec(name: str) -> DatasetSpec:
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise VilError(f"unknown dataset {name!r}; choose from: {', '.join(dataset_names())}")
    return DATASETS[key]


def default_data_dir() -> Path:
    return Path(os.environ.get("VIL_DATA_DIR") or "./data")


# ---------------------------------------------------------------------------------------------------------------
# File formats


def read_gzip_limited(path: Path, limit: int = MAX_IDX_BYTES) -> bytes:
    """Decompress a .gz file, refusing output larger than ``limit`` (a gzip bomb) or a corrupt stream."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise VilError(f"{path}: not a valid gzip file ({e}); delete it to download it again") from None
    if len(data) > limit:
        raise VilError(f"{path}: decompresses to more than {limit} bytes; this is not a dataset file we know")
    return data


def parse_idx(data: bytes, source: str = "IDX data") -> np.ndarray:
    """Parse IDX bytes (uint8 only, as MNIST-style files use). Sizes are checked before anything is allocated."""
    if len(data) < 4:
        raise VilError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08:
        raise VilError(f"{source}: not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 000008xx)")
    if not 1 <= ndim <= 4:
        raise VilError(f"{source}: IDX header claims {ndim} dimensions; expected 1 to 4")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise VilError(f"{source}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for d in dims:
        count *= d
    if count != len(data) - header:
        raise VilError(
            f"{source}: IDX header claims shape {tuple(dims)} ({count} bytes) but the file holds "
            f"{len(data) - header} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class _Refused(pickle.UnpicklingError):
    pass


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise _Refused(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _CorruptArray(pickle.UnpicklingError):
    pass


class _DTypeSpec:
    """What a pickle's ``numpy.dtype(name, align, copy)`` and its state build, checked before numpy sees any of it:
    numpy's own ``dtype.__setstate__`` crashed the interpreter (a segmentation fault, numpy 2.4) on a malformed
    state that a fuzz test of this reader produced from one changed byte. Only plain numeric dtypes, with the state
    numpy writes for them: (3, byte order, None, None, None, elsize, alignment, flags), or version 4 with metadata
    after it. Of that only the byte order matters for a plain dtype; the rest is checked for its form and
    dropped."""

    _NAMES = frozenset(f"{kind}{size}" for kind, sizes in (("u", "1248"), ("i", "1248"), ("f", "48")) for size in sizes)

    def __init__(self, name=None, align=False, copy=True):
        if not isinstance(name, str) or name not in self._NAMES or align not in (False, 0) or copy not in (True, 1):
            raise _Refused(f"refused numpy.dtype{(name, align, copy)!r}: only plain numeric dtypes")
        self.dtype = np.dtype(name)

    def __setstate__(self, state):
        if (type(state) is tuple and len(state) in (8, 9) and state[0] == len(state) - 5
                and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
                and all(type(v) is int for v in state[5:8])):
            if state[1] in ("<", ">"):
                self.dtype = self.dtype.newbyteorder(state[1])
            return
        raise _CorruptArray(f"malformed state for dtype {self.dtype}: {state!r:.200}")


class _ArraySpec:
    """What a pickle's ``numpy.core.multiarray._reconstruct(ndarray, ...)`` and its state build: the array is made
    by this reader from a checked state (version 1, a shape of non-negative ints, a _DTypeSpec, the Fortran flag,
    raw bytes of exactly the shape's size) instead of by numpy's ``ndarray.__setstate__`` on whatever the file
    holds. Replaced by the array itself once the pickle is loaded (:func:`_resolve`)."""

    def __init__(self, cls=None, shape=None, typecode=None):
        if cls is not _NDARRAY:
            raise _Refused("refused numpy _reconstruct of anything but numpy.ndarray")
        self.array = None

    def __setstate__(self, state):
        if type(state) is not tuple or len(state) != 5:
            raise _CorruptArray("malformed array state")
        version, shape, spec, fortran, raw = state
        if (version != 1 or type(shape) is not tuple or len(shape) > 32
                or not all(type(n) is int and 0 <= n < 2 ** 40 for n in shape)):
            raise _CorruptArray(f"malformed array state (version {version!r:.20}, shape {shape!r:.100})")
        if type(spec) is not _DTypeSpec or type(fortran) is not bool:
            raise _CorruptArray("malformed array state (dtype or order)")
        if isinstance(raw, str):  # arrays written by Python 2, read with encoding="latin1"
            raw = raw.encode("latin1")
        if type(raw) not in (bytes, bytearray):
            raise _CorruptArray("malformed array state (data is not bytes)")
        count = math.prod(shape)
        if len(raw) != count * spec.dtype.itemsize:
            raise _CorruptArray(f"array of shape {shape} needs {count * spec.dtype.itemsize} bytes, the file holds "
                                f"{len(raw)}")
        self.array = np.frombuffer(bytes(raw), dtype=spec.dtype).reshape(shape, order="F" if fortran else "C").copy()


_NDARRAY = object()  # what the pickle's numpy.ndarray global stands for: only _ArraySpec's first argument


def _resolve(obj, depth: int = 0):
    """The unpickled object with every _ArraySpec replaced by its array and every _DTypeSpec by its dtype."""
    if depth > 64:
        raise _CorruptArray("nested too deeply")
    if type(obj) is _ArraySpec:
        if obj.array is None:
            raise _CorruptArray("an array without its data")
        return obj.array
    if type(obj) is _DTypeSpec:
        return obj.dtype
    if obj is _NDARRAY:
        raise _Refused("refused a bare numpy.ndarray")
    if type(obj) is dict:
        return {_resolve(k, depth + 1): _resolve(v, depth + 1) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_resolve(v, depth + 1) for v in obj)
    return obj


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR python-version batches contain: numpy arrays and dtypes (plus plain containers,
    which need no global). Anything else -- os.system, builtins.eval, ... -- is refused before it is looked up.
    numpy itself never sees the file's array and dtype states: this reader checks them and builds the arrays
    (:class:`_ArraySpec`, :class:`_DTypeSpec`)."""

    _ALLOWED = {
        ("_codecs", "encode"): _latin1_encode,  # how Python 3 writes bytes in protocol 2 pickles
        ("numpy.core.multiarray", "_reconstruct"): _ArraySpec,  # where numpy 1 pickles name it
        ("numpy._core.multiarray", "_reconstruct"): _ArraySpec,  # numpy 2
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DTypeSpec,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load global {module}.{name}") from None


def safe_unpickle(data: bytes, source: str = "pickle"):
    """Unpickle with :class:`_RestrictedUnpickler`; any failure is a :class:`VilError` naming ``source``."""
    try:
        return _resolve(_RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load())
    except _Refused as e:
        raise VilError(f"{source}: {e}: a CIFAR python-version batch holds only numpy arrays and plain "
                       f"containers; this file is not one (nothing was executed)") from None
    except Exception as e:  # malformed streams raise many types (EOFError, ValueError, TypeError, ...)
        raise VilError(f"{source}: corrupt pickle ({type(e).__name__}: {e})") from None


def parse_cifar_batch(data: bytes, source: str = "CIFAR batch") -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR python-version batch -> (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    obj = safe_unpickle(data, source)
    if not isinstance(obj, dict):
        raise VilError(f"{source}: expected a dict with 'data' and 'labels', got {type(obj).__name__}")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    images, labels = obj.get("data"), obj.get("labels", obj.get("fine_labels"))
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise VilError(f"{source}: 'data' must be a uint8 array of shape (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise VilError(f"{source}: 'labels' is not a list of integers") from None
    if labels.shape != (images.shape[0],):
        raise VilError(f"{source}: {images.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise VilError(f"{source}: labels out of range")
    return images.reshape(-1, 3, 32, 32), labels


def cifar_content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    h.update(np.asarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


def _checksum_error(path: Path, expected: str, got: str) -> VilError:
    return VilError(
        f"{path}: checksum mismatch (expected {expected}, got {got}): the file is corrupt or not the original "
        f"dataset; delete it and run again to download a fresh copy"
    )


def read_resource(path: Path, res: Resource) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Read and verify one file. IDX: verified decompressed bytes; CIFAR: verified pixels and labels."""
    if res.content_kind == "idx":
        data = read_gzip_limited(path)
        digest = hashlib.md5(data).hexdigest()
        if digest != res.content_md5:
            raise _checksum_error(path, res.content_md5, digest)
        return parse_idx(data, str(path))
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise VilError(f"{path}: {size} bytes is larger than any CIFAR batch; not a dataset file we know")
    images, labels = parse_cifar_batch(path.read_bytes(), str(path))
    digest = cifar_content_sha256(images, labels)
    if digest != res.content_md5:
        raise _checksum_error(path, res.content_md5, digest)
    return images, labels


# ---------------------------------------------------------------------------------------------------------------
# Download


def _mirror_urls(spec: DatasetSpec, filename: str) -> list[str]:
    mirror = os.environ.get("VIL_DATA_MIRROR")
    if mirror:
        return [mirror.rstrip("/") + "/" + filename]
    if spec.archive:
        return list(spec.urls)
    return [base + filename for base in spec.urls]


def _download(url: str, dest: Path, timeout: float = 60.0) -> None:
    """Stream ``url`` to a temporary file beside ``dest``; the caller verifies and renames it."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def _fetch_verified(spec: DatasetSpec, filename: str, check, folder: Path) -> Path:
    """Download ``filename`` into a temp file in ``folder``, run ``check(temp_path)``; return the temp path."""
    errors = []
    for url in _mirror_urls(spec, filename):
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=folder)
        os.close(fd)
        tmp = Path(tmp)
        try:
            print(f"downloading {url}", flush=True)
            _download(url, tmp)
            check(tmp)
            return tmp
        except (OSError, VilError) as e:
            tmp.unlink(missing_ok=True)
            errors.append(f"{url}: {e}")
    raise VilError(f"could not download {filename} for {spec.name}: " + " | ".join(errors))


def _safe_extract(archive: Path, members: dict[str, Path]) -> None:
    """Extract only the named regular-file members, each to its given path (no path from the archive is used)."""
    with tarfile.open(archive, "r:*") as tar:
        for member in tar.getmembers():
            if member.name not in members:
                continue
            if not member.isfile():
                raise VilError(f"{archive}: member {member.name} is not a regular file; refusing to extract")
            src = tar.extractfile(member)
            dest = members[member.name]
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(tmp, dest)


def ensure_files(spec: DatasetSpec, data_dir: Path, download: bool = True) -> Path:
    """Make sure every file of ``spec`` is present in ``data_dir/spec.folder``; download what is missing."""
    folder = Path(data_dir) / spec.folder
    missing = [r for r in spec.files if not (folder / r.filename).exists()]
    if not missing:
        return folder
    names = ", ".join(r.filename for r in missing)
    if not download:
        raise VilError(
            f"{spec.name}: missing {names} in {folder}. Put the original files there (from {spec.urls[0]}), "
            f"point --data-dir or VIL_DATA_DIR at a folder that has them, or allow downloading"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VilError(f"cannot create data folder {folder}: {e}") from None
    if spec.archive:
        def check_archive(path: Path):
            digest = hashlib.md5(path.read_bytes()).hexdigest()
            if digest != spec.archive_md5:
                raise _checksum_error(path, spec.archive_md5, digest)

        tmp = _fetch_verified(spec, spec.archive, check_archive, folder)
        try:
            _safe_extract(tmp, {spec.archive_member_prefix + r.filename: folder / r.filename for r in missing})
        finally:
            tmp.unlink(missing_ok=True)
        still = [r.filename for r in missing if not (folder / r.filename).exists()]
        if still:
            raise VilError(f"{spec.archive}: archive lacks {', '.join(still)}")
    else:
        for res in missing:
            tmp = _fetch_verified(spec, res.filename, lambda p, res=res: read_resource(p, res), folder)
            os.replace(tmp, folder / res.filename)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# In-memory datasets


@dataclass
class ImageDataset:
    """A split decoded into memory."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    spec: DatasetSpec

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, start: int, stop: int | None = None) -> "ImageDataset":
        return ImageDataset(self.images[start:stop], self.labels[start:stop], self.spec)


def load_split(name: str, split: str, data_dir: str | Path | None = None, download: bool = True) -> ImageDataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` as uint8 tensors, verified against checksums."""
    spec = get_spec(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = ensure_files(spec, Path(data_dir) if data_dir else default_data_dir(), download=download)
    files = spec.train_files if split == "train" else spec.test_files
    if spec.files[0].content_kind == "idx":
        images = read_resource(folder / files[0].filename, files[0])
        labels = read_resource(folder / files[1].filename, files[1]).astype(np.int64)
        images = images[:, None]  # (N, 1, H, W)
    else:
        parts = [read_resource(folder / r.filename, r) for r in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
    if images.shape[1:] != spec.image_shape or len(images) != len(labels):
        raise VilError(f"{folder}: images of shape {images.shape[1:]} / {len(labels)} labels do not match "
                       f"{spec.name} ({spec.image_shape})")
    return ImageDataset(torch.from_numpy(images.copy()), torch.from_numpy(labels), spec)


def split_off_validation(data: ImageDataset, n: int, setting: str = "val_split") -> tuple[ImageDataset, ImageDataset]:
    """(the first len - n images, the last n): the validation split of ``--val-split n``. ``setting`` names the
    option in the error message."""
    if n < 1:
        raise VilError(f"{setting} must be >= 1, got {n}")
    if n >= len(data):
        raise VilError(f"{setting} {n} leaves no training images (of {len(data)})")
    return data.subset(0, len(data) - n), data.subset(len(data) - n)


# ---------------------------------------------------------------------------------------------------------------
# Batched augmentation and normalisation (on tensors, whole batch at once)


def random_translate(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` on each side (a random shift). (N, C, H, W) -> (N, C, H, W)."""
    if pad <= 0:
        return images
    N, C, H, W = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (N,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :]  # (N, 1, 1, W)
    n = torch.arange(N)[:, None, None, None]
    c = torch.arange(C)[None, :, None, None]
    return padded[n, c, rows, cols]


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Move the content by (dy, dx) pixels (down, right), zero-filling what comes in (as :func:`random_translate`
    pads). (N, C, H, W) -> (N, C, H, W)."""
    N, C, H, W = images.shape
    if abs(dy) >= H or abs(dx) >= W:
        raise ValueError(f"shift ({dy}, {dx}) is not smaller than the image ({H}x{W})")
    out = torch.zeros_like(images)
    out[:, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
        images[:, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def tta_views(images: torch.Tensor, kind: str | None) -> list[torch.Tensor]:
    """The images a test-time-augmented prediction averages over, the original first. (N, C, H, W) each.

    "flip": the image and its mirror image; "shift": the image and its 8 shifts by one pixel (the 3x3
    neighbourhood), for digits, which a mirror image would change into other symbols; "flip-shift": both, the
    9 shifts of the image and the 9 of its mirror image (18 views); None: the image alone.
    """
    def shifts(x: torch.Tensor) -> list[torch.Tensor]:
        return [x] + [shift_images(x, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]

    if kind is None:
        return [images]
    if kind == "flip":
        return [images, images.flip(-1)]
    if kind == "shift":
        return shifts(images)
    if kind == "flip-shift":
        return shifts(images) + shifts(images.flip(-1))
    raise ValueError(f"unknown test-time augmentation {kind!r}; expected flip, shift or flip-shift")


def random_affine(images: torch.Tensor, generator: torch.Generator, degrees: float = 0.0,
                  zoom: float = 0.0) -> torch.Tensor:
    """Random rotation by an angle uniform in [-degrees, degrees] and scaling by a factor uniform in
    [1 - zoom, 1 + zoom] about the image centre, per image, bilinear, zeros outside. (N, C, H, W) uint8 or float ->
    the same shape and dtype (uint8 is rounded back)."""
    if degrees < 0 or not 0 <= zoom < 1:
        raise ValueError(f"rotation degrees must be >= 0 and zoom in [0, 1), got {degrees} and {zoom}")
    if degrees == 0 and zoom == 0:
        return images
    N = images.shape[0]
    u = torch.rand(N, 2, generator=generator, dtype=torch.float64)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * degrees)
    scale = 1 + (2 * u[:, 1] - 1) * zoom
    # affine_grid maps output coordinates to input ones: the inverse transform, rotation by -angle over scale.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, sin, torch.zeros_like(cos)], -1),
                         torch.stack([-sin, cos, torch.zeros_like(cos)], -1)], 1).float()  # (N, 2, 3)
    x = images.float()
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out.to(images.dtype)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def random_erase(images: torch.Tensor, generator: torch.Generator, p: float, fill,
                 area: tuple[float, float] = (0.02, 1 / 3),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): with probability ``p`` per image, one rectangle covering a fraction of
    the image drawn from ``area``, with an aspect ratio (height / width) log-uniform in ``aspect``, is set to
    ``fill`` (one value per channel, e.g. the dataset mean, which normalisation maps to 0). The box is clipped to
    the image instead of being redrawn. (N, C, H, W) -> (N, C, H, W), same dtype.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"erase probability must be in [0, 1], got {p}")
    if p == 0.0:
        return images
    N, _, H, W = images.shape
    u = torch.rand(N, 5, generator=generator, dtype=torch.float64)
    target = H * W * (area[0] + (area[1] - area[0]) * u[:, 0])
    ratio = torch.exp(math.log(aspect[0]) + (math.log(aspect[1]) - math.log(aspect[0])) * u[:, 1])
    h = torch.sqrt(target * ratio).round().clamp(1, H).long()
    w = torch.sqrt(target / ratio).round().clamp(1, W).long()
    y0 = (u[:, 2] * (H - h + 1)).long()
    x0 = (u[:, 3] * (W - w + 1)).long()
    rows = torch.arange(H)[None, :]
    cols = torch.arange(W)[None, :]
    inside = (((rows >= y0[:, None]) & (rows < (y0 + h)[:, None]))[:, :, None]
              & ((cols >= x0[:, None]) & (cols < (x0 + w)[:, None]))[:, None, :])  # (N, H, W)
    erase = (u[:, 4] < p)[:, None, None] & inside
    fill = torch.as_tensor(fill, dtype=images.dtype).reshape(1, -1, 1, 1)
    return torch.where(erase[:, None], fill, images)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, mixup: float = 0.0,
              cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of each image with its partner in the reversed batch.

    images: (N, C, H, W) float; labels: (N,). ``mixup`` and ``cutmix`` are the alphas of the Beta(alpha, alpha)
    mixing weight (0 disables one); with both on, each batch uses one of the two, chosen at random.
    Returns (mixed images, the partners' labels, lam): the loss is lam * CE(labels) + (1 - lam) * CE(partners).
    For CutMix, lam is the fraction of each image left uncovered by the pasted box (after clipping at the border).
    """
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0, got {mixup} and {cutmix}")
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand((), generator=generator) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0:
        return images, labels, 1.0
    # Beta draws from a numpy stream seeded by the torch generator: deterministic per step, so resume is exact.
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (), generator=generator))).beta(alpha, alpha))
    partners, partner_labels = images.flip(0), labels.flip(0)
    if not use_cutmix:
        return torch.lerp(partners, images, lam), partner_labels, lam
    H, W = images.shape[-2:]
    side = math.sqrt(1.0 - lam)  # a box of area (1 - lam) H W, centred anywhere, clipped at the border
    cy, cx = (int(torch.randint(0, n, (), generator=generator)) for n in (H, W))
    y0, y1 = max(cy - int(H * side) // 2, 0), min(cy + int(H * side) // 2, H)
    x0, x1 = max(cx - int(W * side) // 2, 0), min(cx + int(W * side) // 2, W)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = partners[..., y0:y1, x0:x1]
    return mixed, partner_labels, 1.0 - (y1 - y0) * (x1 - x0) / (H * W)


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, standardised with per-channel statistics on the [0, 1] scale."""
    mean = torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1) * 255
    std = torch.tensor(std, dtype=dtype).view(1, -1, 1, 1) * 255
    return (images.to(dtype) - mean) / std
