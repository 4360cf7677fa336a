"""Compression and heterogeneous-rank handling of updates, on arrays."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.common import updates

A, B = "m.q.lora_A.weight", "m.q.lora_B.weight"


def _state(rng: np.random.Generator, rank: int = 4) -> dict[str, np.ndarray]:
    return {A: rng.normal(size=(rank, 6)).astype(np.float32),
            B: rng.normal(size=(5, rank)).astype(np.float32),
            "head.weight": rng.normal(size=(3, 6)).astype(np.float32)}


@pytest.mark.parametrize(("mode", "dtype", "ratio"), [("fp16", np.float16, 2),
                                                       ("int8", np.int8, 4)])
def test_compressed_delta_round_trips_within_its_error_bound(
        mode: str, dtype: type, ratio: int) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    base = _state(rng)
    update = {k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32)
              for k, v in base.items()}
    # Execute
    sent = updates.encode(update, base, mode)
    got = updates.decode(sent, base, mode)
    # Assert: dtype and bytes on the wire, error per value within the bound
    values = {k: v for k, v in sent.items() if not k.endswith(updates.SCALE)}
    assert all(v.dtype == dtype for v in values.values())
    assert sum(v.nbytes for v in values.values()) * ratio == \
        sum(v.nbytes for v in update.values())
    for k in update:
        delta = update[k] - base[k]
        bound = (np.abs(delta).max() / 127 / 2 if mode == "int8"
                 else np.abs(delta).max() * 2 ** -11) + 1e-7
        assert np.abs(got[k] - update[k]).max() <= bound
        assert got[k].dtype == np.float32


def test_int8_of_an_unchanged_tensor_is_exact() -> None:
    base = {"w": np.ones((2, 2), np.float32)}
    sent = updates.encode(base, base, "int8")
    assert sent["w" + updates.SCALE][0] == 1.0
    assert np.array_equal(updates.decode(sent, base, "int8")["w"], base["w"])


@pytest.mark.parametrize(("sent", "match"), [
    ({"w": np.zeros(2, np.float32)}, "int8 compression sends int8, got float32"),
    ({"w": np.zeros(2, np.int8)}, "needs a positive finite scale"),
    ({"w": np.zeros(2, np.int8), "w#scale": np.array([np.nan], np.float32)},
     "positive finite scale"),
    ({"w": np.zeros(2, np.int8), "w#scale": np.array([-1.0], np.float32)},
     "positive finite scale"),
])
def test_malformed_int8_updates_are_refused(sent: dict, match: str) -> None:
    with pytest.raises(updates.UpdateError, match=match):
        updates.decode(sent, {"w": np.zeros(2, np.float32)}, "int8")


def test_lower_rank_slice_truncates_and_pads_back() -> None:
    # Prepare: a rank-4 global, a rank-2 site
    rng = np.random.default_rng(1)
    glob = _state(rng, rank=4)
    # Execute
    small = updates.truncate(glob, 2)
    trained = {k: v + 1.0 for k, v in small.items()}
    full = updates.pad(trained, glob)
    # Assert: shapes, the site's ranks replaced, the others kept from the global
    assert small[A].shape == (2, 6) and small[B].shape == (5, 2)
    assert updates.site_rank(small) == 2 and updates.site_rank(glob) == 4
    assert full[A].shape == (4, 6) and full[B].shape == (5, 4)
    assert np.array_equal(full[A][:2], glob[A][:2] + 1) and \
        np.array_equal(full[A][2:], glob[A][2:])
    assert np.array_equal(full[B][:, :2], glob[B][:, :2] + 1) and \
        np.array_equal(full[B][:, 2:], glob[B][:, 2:])
    assert np.array_equal(full["head.weight"], glob["head.weight"] + 1)
    # ... and the product B @ A of the padded update keeps the global's ranks 2-3
    assert np.allclose(full[B] @ full[A] - trained[B] @ trained[A],
                       glob[B][:, 2:] @ glob[A][2:], atol=1e-5)


def test_compressed_lower_rank_delta_decodes_against_the_global_prefix() -> None:
    rng = np.random.default_rng(2)
    glob = _state(rng, rank=4)
    small = updates.truncate(glob, 2)
    trained = {k: v + 0.5 for k, v in small.items()}
    got = updates.pad(updates.decode(updates.encode(trained, small, "fp16"), glob,
                                     "fp16"), glob)
    assert np.allclose(got[A][:2], trained[A], atol=1e-3)
    assert np.array_equal(got[A][2:], glob[A][2:])


@pytest.mark.parametrize(("bad", "match"), [
    ({A: np.zeros((2, 7), np.float32)}, "not a rank slice"),
    ({A: np.zeros((5, 6), np.float32)}, "not a rank slice"),
    ({A: np.zeros((2, 6), np.float32), B: np.zeros((5, 3), np.float32)},
     "ranks \\[2, 3\\] in one update"),
])
def test_pad_refuses_tensors_that_are_not_one_rank_slice(bad: dict, match: str
                                                         ) -> None:
    glob = _state(np.random.default_rng(3), rank=4)
    with pytest.raises(updates.UpdateError, match=match):
        updates.pad(bad, glob)
