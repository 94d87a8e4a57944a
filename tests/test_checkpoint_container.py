"""The core checkpoint container (lowrank_core.checkpoint) and the core state_dicts (Subspace, OnlineCMD):
round trips, the digest, clear CheckpointErrors, nothing changed by a failed load."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lowrank_core as lc
from lowrank_core import checkpoint as container
from lowrank_core.cmd import OnlineCMD


def _tree():
    return {
        "model": {"w": np.arange(6.0).reshape(2, 3), "b": np.zeros(3, np.float32)},
        "state": {0: {"step": 3, "exp_avg": np.ones(2)}, 1: {"step": 3}},  # int keys
        "groups": [{"lr": 0.1, "betas": (0.9, 0.999), "name": None, "flag": True}],
        "numbers": [math.nan, math.inf, -0.0, 2**40, "text"],
        "raw": container.RawArray(np.array([16256, 16384], np.uint16), "bfloat16_like"),
        "misc": {"__weird": {("a", 1): np.int64(7)}},
    }


def test_a_tree_round_trips(tmp_path):
    path = container.save(tmp_path / "c.npz", _tree(), format="test/1")
    fmt, got = container.load(path, formats=("test/1",))
    assert fmt == "test/1"
    np.testing.assert_array_equal(got["model"]["w"], np.arange(6.0).reshape(2, 3))
    assert got["model"]["b"].dtype == np.float32
    assert set(got["state"]) == {0, 1} and got["state"][1] == {"step": 3}
    assert got["groups"][0] == {"lr": 0.1, "betas": (0.9, 0.999), "name": None, "flag": True}
    nums = got["numbers"]
    assert math.isnan(nums[0]) and nums[1] == math.inf and math.copysign(1, nums[2]) < 0
    assert nums[3:] == [2**40, "text"]
    assert isinstance(got["raw"], container.RawArray) and got["raw"].dtype == "bfloat16_like"
    np.testing.assert_array_equal(got["raw"].bits, [16256, 16384])
    assert got["misc"] == {"__weird": {("a", 1): 7}}


def test_bfloat16_arrays_come_back_as_bfloat16(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.arange(4).astype(ml_dtypes.bfloat16) / 3
    container.save(tmp_path / "b.npz", {"a": a}, format="t")
    _, got = container.load(tmp_path / "b.npz", formats=("t",))
    assert got["a"].dtype == a.dtype
    np.testing.assert_array_equal(got["a"].view(np.uint16), a.view(np.uint16))


def test_an_empty_array_of_an_unknown_dtype_round_trips(tmp_path):
    empty = container.RawArray(np.zeros((0, 3), np.uint16), "bfloat16_like")
    path = container.save(tmp_path / "e.npz", {"e": empty}, format="test/1")
    _, got = container.load(path, formats=("test/1",))
    assert isinstance(got["e"], container.RawArray) and got["e"].dtype == "bfloat16_like"
    assert got["e"].bits.shape == (0, 3)


def test_corrupt_foreign_and_missing_files_are_checkpoint_errors(tmp_path):
    path = container.save(tmp_path / "c.npz", _tree(), format="test/1")
    with pytest.raises(lc.CheckpointError, match="format 'test/1'; this version reads 'other/2'"):
        container.load(path, formats=("other/2",))
    data = bytearray(path.read_bytes())
    i = data.index(np.arange(6.0).tobytes())  # inside the first array's bytes
    data[i + 9] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(lc.CheckpointError, match="corrupt"):
        container.load(path, formats=("test/1",))
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(lc.CheckpointError, match="not a readable checkpoint"):
        container.load(tmp_path / "x.npz", formats=("test/1",))
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(lc.CheckpointError, match="no manifest or digest"):
        container.load(tmp_path / "plain.npz", formats=("test/1",))
    with pytest.raises(lc.CheckpointError, match="no checkpoint file"):
        container.load(tmp_path / "none.npz", formats=("test/1",))


def test_a_failed_save_keeps_the_previous_file_and_writes_nothing(tmp_path):
    path = container.save(tmp_path / "c.npz", {"a": np.ones(2)}, format="t")
    before = path.read_bytes()
    with pytest.raises(lc.ParameterTypeError, match="holds"):
        container.save(path, {"a": np.zeros(2), "f": print}, format="t")
    with pytest.raises(lc.ParameterTypeError, match="dict key"):
        container.save(path, {"a": {frozenset(): 1}}, format="t")
    with pytest.raises(lc.ParameterTypeError, match="top-level"):
        container.save(path, {"format": 1}, format="t")
    with pytest.raises(lc.ParameterError, match="directory"):
        container.save(tmp_path, {"a": 1}, format="t")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temporary file left


def _subspace():
    rng = np.random.default_rng(0)
    return lc.fit_subspace(rng.standard_normal((6, 20)), 3)


def test_subspace_state_dict_round_trips_and_refuses_bad_content():
    sub = _subspace()
    again = lc.Subspace.from_state_dict(sub.state_dict(), dim=20)
    for name in ("centre", "basis", "explained_variance"):
        np.testing.assert_array_equal(getattr(again, name), getattr(sub, name))
    assert (again.total_variance, again.num_snapshots) == (sub.total_variance, sub.num_snapshots)
    good = sub.state_dict()
    for bad, match in [
        ({k: v for k, v in good.items() if k != "basis"}, "missing \\['basis'\\]"),
        ({**good, "origin": 1}, "unexpected \\['origin'\\]"),
        ({**good, "centre": good["centre"][:-1]}, "inconsistent"),
        ({**good, "basis": np.zeros((3, 20), np.int64)}, "do not fit"),
        ({**good, "total_variance": math.nan}, "total_variance"),
        ({**good, "num_snapshots": 0}, "num_snapshots"),
        ("state", "must be a dict"),
    ]:
        with pytest.raises(lc.CheckpointError, match=match):
            lc.Subspace.from_state_dict(bad)  # type: ignore[arg-type]
    with pytest.raises(lc.CheckpointError, match="20 dimensions, these parameters have 21"):
        lc.Subspace.from_state_dict(good, dim=21)


def _online():
    rng = np.random.default_rng(1)
    t = np.cumsum(rng.standard_normal((40, 6)), axis=1)
    cmd = OnlineCMD.from_trajectory(t, 3, num_samples=40)
    cmd.update(t[:, -1] + 0.1)
    return cmd


def test_online_cmd_load_state_dict_validates_then_applies():
    cmd, other = _online(), _online()
    other.update(np.ones(40))
    want = other.state_dict()
    before = {k: np.array(v, copy=True) for k, v in cmd.state_dict().items() if k != "unit"}
    for bad in (
        {k: v for k, v in want.items() if k != "c_wr"},
        {**want, "w_mean": want["w_mean"][:-1]},
        {**want, "r_m2": -np.abs(want["r_m2"])},
        "state",
    ):
        with pytest.raises(lc.CheckpointError):
            cmd.load_state_dict(bad)  # type: ignore[arg-type]
        for k, v in before.items():  # nothing changed
            np.testing.assert_array_equal(cmd.state_dict()[k], v)
    cmd.load_state_dict(want)
    assert cmd.epochs == other.epochs
    for k, v in want.items():
        np.testing.assert_array_equal(cmd.state_dict()[k], v)
    np.testing.assert_array_equal(cmd.weights(), other.weights())
