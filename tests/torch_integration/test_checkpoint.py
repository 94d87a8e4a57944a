"""save_checkpoint / load_checkpoint: resume equals an uninterrupted run; bad files fail clearly."""

from __future__ import annotations

import io
import struct
import sys
import zipfile
import zlib

import numpy as np
import pytest

import lowrank_core as lc
from lowrank_core import checkpoint as container

torch = pytest.importorskip("torch")
nn = torch.nn

from lowrank_torch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    model = model.double()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    cfg = OIALRConfig(switch_step=4, update_every=5, rule=lc.SigmaCutoff(0.4))
    return model, opt, sched, OIALR(model, opt, cfg)


def _batches(n: int = 30):
    g = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(16, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (16,), generator=g),
        )
        for _ in range(n)
    ]


def _run(model, opt, sched, ctrl, batches):
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ctrl.step()
        losses.append(loss.item())
    return losses


def test_resume_matches_an_uninterrupted_run(tmp_path):
    batches = _batches()
    straight = _run(*_build(), batches)
    model, opt, sched, ctrl = _build()
    first = _run(model, opt, sched, ctrl, batches[:13])
    assert any(e["new"] < e["old"] for e in ctrl.events("rank")), (
        "the checkpoint must follow a rank change"
    )
    path = save_checkpoint(
        tmp_path / "run.pt",
        model=model,
        optimizer=opt,
        oialr=ctrl,
        scheduler=sched,
        extra={"epoch": 3},
    )
    model, opt, sched, ctrl = _build()  # fresh, dense
    extra = load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert extra == {"epoch": 3}
    second = _run(model, opt, sched, ctrl, batches[13:])
    assert first + second == pytest.approx(straight, rel=1e-9, abs=1e-12)


def test_corrupt_and_foreign_files_fail_clearly(tmp_path):
    model, opt, sched, ctrl = _build()
    _run(model, opt, sched, ctrl, _batches(6))
    good = save_checkpoint(tmp_path / "good.pt", model=model, optimizer=opt, oialr=ctrl)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, match in (
        ("trunc.pt", "not a readable checkpoint"),
        ("junk.pt", "not a readable checkpoint"),
        ("foreign.pt", "not a lowrank_torch checkpoint"),
        ("missing.pt", "no checkpoint at"),
    ):
        fresh, fopt, _, fctrl = _build()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / name, model=fresh, optimizer=fopt, oialr=fctrl)
        after = fresh.state_dict()
        assert before.keys() == after.keys() and all(
            torch.equal(before[k], after[k]) for k in before
        )
        assert not fctrl.switched


def test_mismatched_model_and_missing_controller(tmp_path):
    model, opt, sched, ctrl = _build()
    _run(model, opt, sched, ctrl, _batches(6))
    del sched
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    other = nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    oopt = torch.optim.SGD(other.parameters(), lr=0.1)
    octrl = OIALR(other, oopt, OIALRConfig(switch_step=4))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=other, optimizer=oopt, oialr=octrl)
    fresh, fopt, _, _ = _build()
    with pytest.raises(CheckpointError, match="pass the controller"):
        load_checkpoint(path, model=fresh, optimizer=fopt)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model, opt, _sched, ctrl = _build()
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    before = path.read_bytes()
    with pytest.raises(lc.ParameterTypeError, match=r"\['extra'\]\['bad'\]"):
        save_checkpoint(path, model=model, extra={"bad": lambda: None})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


# --------------------------------------------------------------------------------------------------
# atomic loading: a checkpoint that does not fit changes nothing (issue 9, defect 4)
# --------------------------------------------------------------------------------------------------
def _tensor_tree(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape), x.detach().clone())
    if isinstance(x, dict):
        return {k: _tensor_tree(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_tensor_tree(v) for v in x]
    return x


def _same(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "tensor":
        if not (isinstance(b, tuple) and a[:3] == b[:3]):
            return False
        x, y = a[3], b[3]
        if x.is_floating_point():
            return bool(torch.allclose(x, y, rtol=0.0, atol=0.0, equal_nan=True))
        return torch.equal(x, y)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _full_state(model, opt, ctrl, sched=None):
    """Everything a load may touch: structure, parameter identities, values, optimizer, controller."""
    params = list(model.parameters())
    pid = {id(p): i for i, p in enumerate(params)}
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "param_ids": [id(p) for p in params],
        "model": _tensor_tree(model.state_dict()),
        "groups": [
            (
                [pid.get(id(p), -1) for p in g["params"]],
                {k: v for k, v in g.items() if k != "params"},
            )
            for g in opt.param_groups
        ],
        "group_ids": [id(g) for g in opt.param_groups],
        "opt_state": {pid.get(id(p), -1): _tensor_tree(dict(s)) for p, s in opt.state.items()},
        "ctrl": _tensor_tree(ctrl.state_dict()) if ctrl is not None else None,
        "ctrl_layers": sorted(ctrl.layers) if ctrl is not None else None,
        "sched": dict(sched.state_dict()) if sched is not None else None,
    }


def _assert_unchanged(before, after):
    for key in before:
        assert _same(before[key], after[key]), f"{key} changed"


def _as_tensors(x):
    """A tree read by the core container with its NumPy arrays as tensors."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, dict):
        return {k: _as_tensors(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_as_tensors(v) for v in x)
    return x


def _as_arrays(x):
    """A tree with its tensors as NumPy arrays (what the core container stores)."""
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    if isinstance(x, dict):
        return {k: _as_arrays(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_as_arrays(v) for v in x)
    return x


def _read_tree(path):
    """The checkpoint's entries, read with the core container directly, tensors as tensors."""
    from lowrank_torch import checkpoint as ck

    found, tree = container.load(path, formats=(ck.FORMAT,))
    assert found == ck.FORMAT
    return _as_tensors(tree)


def _rewrite(path, change):
    """Rewrite a checkpoint with a change, sealed again with a valid digest (a consistent file)."""
    from lowrank_torch import checkpoint as ck

    tree = _read_tree(path)
    change(tree)
    container.save(path, _as_arrays(tree), format=ck.FORMAT)
    return path


def _trained_checkpoint(tmp_path, name="c.pt", make_opt=None, steps=13):
    model, opt, sched, ctrl = _build()
    if make_opt is not None:
        opt = make_opt(model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        ctrl = OIALR(model, opt, ctrl.config)
    _run(model, opt, sched, ctrl, _batches(steps))
    assert ctrl.switched and any(e["new"] < e["old"] for e in ctrl.events("rank"))
    return save_checkpoint(
        tmp_path / name, model=model, optimizer=opt, oialr=ctrl, scheduler=sched
    ), ctrl


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def _mismatched_targets():
    """(description, builder of a target (model, opt, sched, ctrl) the checkpoint does not fit)."""

    def narrower():
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
        ).double()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return model, opt, sched, OIALR(model, opt, OIALRConfig(switch_step=4))

    def other_head():  # same eligible layers, same shapes, but the dense head differs
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)
        ).double()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return model, opt, sched, OIALR(model, opt, OIALRConfig(switch_step=4))

    def sgd_target():
        model, _, _, ctrl = _build()
        opt = _sgd(model)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return model, opt, sched, OIALR(model, opt, ctrl.config)

    return {"narrower": narrower, "other_head": other_head, "sgd_target": sgd_target}


@pytest.mark.parametrize("target", ["narrower", "other_head", "sgd_target"])
def test_a_checkpoint_of_another_model_or_optimizer_changes_nothing(tmp_path, target):
    path, _ = _trained_checkpoint(tmp_path)
    model, opt, sched, ctrl = _mismatched_targets()[target]()
    before = _full_state(model, opt, ctrl, sched)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    _assert_unchanged(before, _full_state(model, opt, ctrl, sched))
    assert not ctrl.switched and not ctrl.layers


def test_sgd_state_into_adamw_is_refused_at_load(tmp_path):
    path, _ = _trained_checkpoint(tmp_path, make_opt=_sgd)
    model, opt, sched, ctrl = _build()  # AdamW
    before = _full_state(model, opt, ctrl, sched)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    _assert_unchanged(before, _full_state(model, opt, ctrl, sched))


def _tamper_rank(value):
    def change(blob):
        blob["oialr"]["ranks"]["2"] = value

    return change


def _tamper_shape(blob):
    blob["model"]["2.sigma"] = torch.zeros(3, 3, dtype=torch.float64)


def _tamper_u(blob):
    u = blob["model"]["0.U"]
    blob["model"]["0.U"] = torch.zeros(u.shape[0] + 1, u.shape[1], dtype=u.dtype)


def _tamper_optimizer_shape(blob):
    state = blob["optimizer"]["state"]
    key = next(k for k, s in state.items() if s["exp_avg"].ndim == 2)
    state[key]["exp_avg"] = torch.zeros(2, 3, dtype=torch.float64)


def _tamper_optimizer_key(blob):
    for s in blob["optimizer"]["state"].values():
        s.pop("exp_avg_sq")


def _tamper_switched(blob):
    blob["oialr"]["switched"]["4"] = 3  # the head is not eligible


def _tamper_step(blob):
    blob["oialr"]["step_count"] = -5


def _tamper_groups(blob):
    blob["optimizer"]["param_groups"][0]["params"].pop()


def _tamper_scheduler(blob):
    blob["scheduler"] = {"not": "a StepLR state"}


@pytest.mark.parametrize(
    "change",
    [
        _tamper_rank(0),
        _tamper_rank(999),
        _tamper_rank(2.5),
        _tamper_shape,
        _tamper_u,
        _tamper_optimizer_shape,
        _tamper_optimizer_key,
        _tamper_switched,
        _tamper_step,
        _tamper_groups,
        _tamper_scheduler,
    ],
    ids=[
        "rank0",
        "rank999",
        "rank2.5",
        "sigma_shape",
        "U_shape",
        "opt_shape",
        "opt_key",
        "switched_head",
        "negative_step",
        "group_size",
        "scheduler",
    ],
)
def test_a_tampered_checkpoint_changes_nothing(tmp_path, change):
    path, _ = _trained_checkpoint(tmp_path)
    _rewrite(path, change)
    model, opt, sched, ctrl = _build()
    before = _full_state(model, opt, ctrl, sched)
    with pytest.raises(CheckpointError, match=r"does not fit|invalid|malformed") as info:
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert "digest" not in str(info.value)  # refused for its content: the file itself is sound
    _assert_unchanged(before, _full_state(model, opt, ctrl, sched))
    assert not ctrl.switched and not ctrl.layers
    # and the untampered run still loads into the same (unchanged) objects
    good, _ = _trained_checkpoint(tmp_path, name="good.pt")
    load_checkpoint(good, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert ctrl.switched


def _array_members(path):
    """(local header offset, member start, data offset, data length) of every stored array inside the
    checkpoint's .npz archive (the manifest and the digest left out)."""
    members = []
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename.startswith("__") or info.compress_type != zipfile.ZIP_STORED:
                continue
            start = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[start + 26 : start + 30])
            member = start + 30 + name_len + extra_len
            npy = io.BytesIO(raw[member : member + info.file_size])
            version = np.lib.format.read_magic(npy)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(npy)
            else:
                np.lib.format.read_array_header_2_0(npy)
            header = npy.tell()
            members.append((start, member, member + header, info.file_size - header))
    return members


def _fix_zip_crc(data, header_offset, member, size):
    """Write the CRC-32 of a changed member into its local and central zip headers, so that only the
    checkpoint's own digest can notice the change."""
    crc = zlib.crc32(bytes(data[member : member + size]))
    struct.pack_into("<I", data, header_offset + 14, crc)
    central = data.find(b"PK\x01\x02")
    while central >= 0:
        if struct.unpack_from("<I", data, central + 42)[0] == header_offset:
            struct.pack_into("<I", data, central + 16, crc)
            return
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, central + 28)
        central = data.find(b"PK\x01\x02", central + 46 + name_len + extra_len + comment_len)
    raise AssertionError("no central directory entry for the changed member")


@pytest.mark.parametrize("zip_crc", ["stale", "fixed"])
def test_flipped_bytes_inside_tensor_data_are_detected(tmp_path, zip_crc):
    path, _ = _trained_checkpoint(tmp_path)
    header_offset, member, offset, size = max(_array_members(path), key=lambda m: m[3])
    assert size >= 512
    data = bytearray(path.read_bytes())
    for i in range(64):
        data[offset + 100 + 3 * i] ^= 0x5A
    if zip_crc == "fixed":
        _fix_zip_crc(data, header_offset, member, offset + size - member)
    path.write_bytes(bytes(data))
    model, opt, sched, ctrl = _build()
    before = _full_state(model, opt, ctrl, sched)
    # the zip layer's CRC-32 catches a plain flip; the SHA-256 digest one that kept the CRC valid
    match = "digest" if zip_crc == "fixed" else "Bad CRC-32|digest"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    _assert_unchanged(before, _full_state(model, opt, ctrl, sched))


def test_oialr_load_state_dict_alone_is_atomic(tmp_path):
    _, saved = _trained_checkpoint(tmp_path)
    state = saved.state_dict()
    state["ranks"]["2"] = 0  # the second switched layer cannot be rebuilt
    model, opt, sched, ctrl = _build()
    before = _full_state(model, opt, ctrl, sched)
    with pytest.raises(lc.LowRankError, match="'2'"):
        ctrl.load_state_dict(state)
    _assert_unchanged(before, _full_state(model, opt, ctrl, sched))


def test_bad_paths_and_objects_get_library_errors(tmp_path):
    model, opt, _sched, ctrl = _build()
    for bad in (None, 3, b"bytes.pt"):
        with pytest.raises(lc.ParameterTypeError, match="path"):
            save_checkpoint(bad, model=model)
        with pytest.raises(lc.ParameterTypeError, match="path"):
            load_checkpoint(bad, model=model)
    with pytest.raises(lc.ParameterError, match="directory"):
        save_checkpoint(tmp_path, model=model)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path, model=model)
    with pytest.raises(lc.ParameterTypeError, match="model"):
        save_checkpoint(tmp_path / "x.pt", model="model")
    with pytest.raises(lc.ParameterTypeError, match="optimizer"):
        save_checkpoint(tmp_path / "x.pt", model=model, optimizer="adamw")
    with pytest.raises(lc.ParameterTypeError, match="extra"):
        save_checkpoint(tmp_path / "x.pt", model=model, extra=[1, 2])
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    with pytest.raises(lc.ParameterTypeError, match="verify"):
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, verify="no")
    other, _oopt, _, octrl = _build()
    with pytest.raises(CheckpointError, match="another model"):
        load_checkpoint(path, model=other, optimizer=opt, oialr=ctrl)
    assert not ctrl.switched and not octrl.switched


def test_files_of_the_previous_formats_still_load(tmp_path):
    """torch.save files of format /2 (0.1.0, with a digest) load checked; /1 (no digest) only with
    verify=False; a /2 file changed after it was saved is refused by its digest."""
    from lowrank_torch import legacy_checkpoint as legacy

    path, saved = _trained_checkpoint(tmp_path)
    payload = _read_tree(path)
    payload.pop("model_metadata")
    v2 = {"format": legacy.FORMAT_V2, **payload}
    v2["digest"] = {"algorithm": "sha256", "value": legacy.digest(v2)}
    torch.save(v2, tmp_path / "v2.pt")
    model, opt, sched, ctrl = _build()
    load_checkpoint(tmp_path / "v2.pt", model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert ctrl.ranks() == saved.ranks()

    v2["model"]["0.U"] = v2["model"]["0.U"] + 1e-3
    torch.save(v2, tmp_path / "v2_changed.pt")
    model, opt, sched, ctrl = _build()
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(
            tmp_path / "v2_changed.pt", model=model, optimizer=opt, oialr=ctrl, scheduler=sched
        )
    assert not ctrl.switched

    v1 = {k: v for k, v in payload.items() if k not in ("optimizer_type", "scheduler_type")}
    v1["format"] = legacy.FORMAT_V1
    torch.save(v1, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match="verify=False"):
        load_checkpoint(tmp_path / "v1.pt", model=model, optimizer=opt, oialr=ctrl, scheduler=sched)
    assert not ctrl.switched
    load_checkpoint(
        tmp_path / "v1.pt", model=model, optimizer=opt, oialr=ctrl, scheduler=sched, verify=False
    )
    assert ctrl.ranks() == saved.ranks()


def test_checkpoint_error_is_the_core_class() -> None:
    """One CheckpointError for every framework: ``except lowrank_core.CheckpointError`` catches the
    torch integration's (and the JAX integration's) refusals."""
    import lowrank_torch

    assert CheckpointError is lc.CheckpointError is lowrank_torch.oialr.CheckpointError
    assert issubclass(CheckpointError, lc.LowRankError) and issubclass(CheckpointError, ValueError)


# --------------------------------------------------------------------------------------------------
# the file is the core's container: tensors of every dtype and the extra values come back as saved
# --------------------------------------------------------------------------------------------------
def test_the_file_is_the_core_container_without_pickle(tmp_path):
    from lowrank_torch import checkpoint as ck

    model, opt, sched, ctrl = _build()
    _run(model, opt, sched, ctrl, _batches(6))
    path = save_checkpoint(
        tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl, scheduler=sched
    )
    assert not zipfile.ZipFile(path).namelist()[0].endswith("data.pkl")
    with np.load(path, allow_pickle=False) as z:  # every member reads without unpickling anything
        assert all(isinstance(z[name], np.ndarray) for name in z.files)
    found, tree = container.load(path, formats=(ck.FORMAT,))
    assert found == "lowrank_torch.checkpoint/3"
    assert set(tree) >= {"model", "optimizer", "optimizer_type", "oialr", "scheduler"}
    assert isinstance(tree["model"]["4.weight"], np.ndarray)
    assert set(tree["optimizer"]["state"]) == set(range(6))  # integer keys kept
    assert tree["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples kept


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_dtypes_and_extra_values_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).to(torch.bfloat16)
    model[2].to(torch.float16)
    model[:2](torch.randn(4, 5, dtype=torch.bfloat16))  # running stats and num_batches_tracked move
    extra = {
        "epoch": 3,
        "loss": float("nan"),
        "best": float("inf"),
        "name": "run",
        "none": None,
        "pair": (1, "a"),
        "by_step": {10: 0.5, 20: 0.25},
        "bf16": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 3,
        "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e4m3fn),
        "mask": torch.tensor([True, False]),
        "ids": torch.arange(4, dtype=torch.int32),
        "z": torch.tensor([1 + 2j], dtype=torch.complex64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.bfloat16),
    }
    path = save_checkpoint(tmp_path / "c.pt", model=model, extra=extra)
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).to(torch.bfloat16)
    fresh[2].to(torch.float16)
    got = load_checkpoint(path, model=fresh)
    want_state, got_state = model.state_dict(), fresh.state_dict()
    assert want_state.keys() == got_state.keys()
    for key, value in want_state.items():
        assert got_state[key].dtype == value.dtype and torch.equal(got_state[key], value), key
    assert got.keys() == extra.keys()
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(got[key], torch.Tensor) and got[key].dtype == value.dtype, key
            assert got[key].shape == value.shape, key
            assert torch.equal(_bytes(got[key]), _bytes(value)), key
        elif isinstance(value, float) and value != value:
            assert got[key] != got[key]
        else:
            assert got[key] == value and type(got[key]) is type(value), key


_WITHOUT_ML_DTYPES = """
import sys
sys.modules["ml_dtypes"] = None  # `import ml_dtypes` raises ImportError: NumPy lacks bfloat16
import torch
from torch import nn
from lowrank_core import checkpoint as container
from lowrank_torch.checkpoint import FORMAT, load_checkpoint

path = sys.argv[1]
_, tree = container.load(path, formats=(FORMAT,))
assert isinstance(tree["extra"]["bf16"], container.RawArray), type(tree["extra"]["bf16"])
got = load_checkpoint(path, model=nn.Linear(3, 2))
want = {
    "bf16": torch.arange(6, dtype=torch.bfloat16) / 3,
    "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e5m2),
    "empty": torch.zeros(0, 2, dtype=torch.bfloat16),
}
for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    assert torch.equal(got[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
print("ok")
"""


def test_bfloat16_and_float8_load_without_ml_dtypes(tmp_path):
    """Without ml_dtypes (a PyTorch-only install) the container hands back raw bits with the dtype's
    name; the tensors still come back in their dtype (checked in a fresh interpreter)."""
    import subprocess

    extra = {
        "bf16": torch.arange(6, dtype=torch.bfloat16) / 3,
        "f8": torch.tensor([0.5, -2.0], dtype=torch.float8_e5m2),
        "empty": torch.zeros(0, 2, dtype=torch.bfloat16),
    }
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "c.pt", model=nn.Linear(3, 2), extra=extra)
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_ML_DTYPES, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_values_a_checkpoint_cannot_keep_are_named_at_save(tmp_path):
    model, *_ = _build()
    path = save_checkpoint(tmp_path / "c.pt", model=model)
    before = path.read_bytes()
    for extra, where in (
        ({"arr": np.zeros(3)}, r"\['extra'\]\['arr'\] is a NumPy array"),
        ({"deep": [1, {"obj": object()}]}, r"\['extra'\]\['deep'\]\[1\]\['obj'\]"),
        ({"sparse": torch.eye(3).to_sparse()}, r"\['extra'\]\['sparse'\].*dense"),
    ):
        with pytest.raises(lc.ParameterTypeError, match=where):
            save_checkpoint(path, model=model, extra=extra)
        assert path.read_bytes() == before


def test_foreign_container_files_and_bad_map_location_fail_clearly(tmp_path):
    model, opt, _sched, ctrl = _build()
    other = container.save(
        tmp_path / "jax.npz", {"params": np.zeros(3)}, format="lowrank_jax.checkpoint/1"
    )
    with pytest.raises(CheckpointError, match=r"lowrank_jax\.checkpoint/1"):
        load_checkpoint(other, model=model, optimizer=opt, oialr=ctrl)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a lowrank-core checkpoint"):
        load_checkpoint(tmp_path / "plain.npz", model=model)
    path = save_checkpoint(tmp_path / "c.pt", model=model, optimizer=opt, oialr=ctrl)
    with pytest.raises(lc.ParameterTypeError, match="map_location"):
        load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, map_location={"cuda": "cpu"})
    load_checkpoint(path, model=model, optimizer=opt, oialr=ctrl, map_location=torch.device("cpu"))
    assert not ctrl.switched
