"""The MNIST-1D demo (the main job): data, models, the training loop, the method registry and the CLI."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mnist1d")

from lowrank_torch import demo  # noqa: E402
from lowrank_torch.demo import cli, data, methods, models  # noqa: E402

QUICK_SAMPLES = 1000


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One CPU thread: small models gain nothing from more, and a busy machine slows threads badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mnist() -> data.MNIST1D:
    return data.load_mnist1d(seed=0, num_samples=QUICK_SAMPLES)


def test_data_shapes_dtypes_and_split(mnist):
    n_train = int(0.8 * QUICK_SAMPLES)
    assert mnist.x_train.shape == (n_train, 40)
    assert mnist.x_test.shape == (QUICK_SAMPLES - n_train, 40)
    assert mnist.y_train.shape == (n_train,)
    assert mnist.y_test.shape == (QUICK_SAMPLES - n_train,)
    assert mnist.x_train.dtype == torch.float32
    assert mnist.x_test.dtype == torch.float32
    assert mnist.y_train.dtype == torch.int64
    assert set(mnist.y_train.tolist()) == set(range(10))
    assert mnist.length == 40
    assert mnist.num_classes == 10


def test_data_is_standardized_with_train_statistics(mnist):
    assert abs(float(mnist.x_train.mean())) < 1e-4
    assert abs(float(mnist.x_train.std(unbiased=False)) - 1.0) < 1e-4
    # The test set is shifted and scaled by the same numbers, so it is only close to standard.
    assert abs(float(mnist.x_test.mean())) < 0.2
    assert abs(float(mnist.x_test.std()) - 1.0) < 0.2


def test_data_is_deterministic_per_seed_and_leaves_global_rngs_alone():
    import random

    import numpy as np

    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    before = (random.random(), np.random.random())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    data._CACHE.clear()
    a = data.load_mnist1d(seed=3, num_samples=200)
    assert (random.random(), np.random.random()) == before  # noqa: NPY002
    data._CACHE.clear()
    b = data.load_mnist1d(seed=3, num_samples=200)
    c = data.load_mnist1d(seed=4, num_samples=200)
    for t, u in zip(a, b, strict=True):
        assert torch.equal(t, u)
    assert not torch.equal(a.x_train, c.x_train)
    a.x_train.zero_()  # fresh tensors each call: the cache is not touched
    assert not torch.equal(a.x_train, data.load_mnist1d(seed=3, num_samples=200).x_train)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_model_forward_shape_and_seeded_init(name, mnist):
    model = models.build_model(name, seed=0)
    out = model(mnist.x_test[:7])
    assert out.shape == (7, 10)
    assert torch.isfinite(out).all()
    assert models.count_params(model) > 50_000  # big enough for low rank to remove something
    again = models.build_model(name, seed=0)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unknown_model_and_method_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet")
    with pytest.raises(ValueError, match="unknown method"):
        methods.make_method("nope")


def test_registry_has_dense_and_oialr_and_dense_is_a_method():
    assert methods.method_names()[:2] == ["dense", "oialr"]
    assert "dense" in methods.available_methods()
    dense = methods.make_method("dense")
    assert isinstance(dense, methods.Method)
    model = models.build_model("mlp")
    n = models.count_params(model)
    assert dense.trainable_share(model, n) == 1.0


def test_register_method_adds_a_method_to_the_loop(mnist):
    calls: list[int] = []

    class Counting(methods.Dense):
        name = "counting-test"

        def after_step(self, step: int) -> None:
            calls.append(step)

    if "counting-test" not in methods.method_names():
        methods.register_method("counting-test")(Counting)
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("counting-test")(Counting)
    m = methods.make_method("counting-test")
    demo.train(models.build_model("mlp"), mnist, method=m, epochs=1, batch_size=256, progress=False)
    assert calls == list(range(1, 5))  # ceil(800 / 256) steps, counted from 1
    methods._REGISTRY.pop("counting-test")


def test_optional_hooks_take_step_after_epoch_and_evaluation(mnist):
    import contextlib

    import torch

    events: list[str] = []

    class Hooked(methods.Dense):
        name = "hooked-test"

        def setup(self, model, optimizer, steps_per_epoch, epochs):
            self.model, self.opt = model, optimizer

        def take_step(self, step, closure):
            if step % 2:  # odd steps: the loop's plain step
                return None
            loss = closure()
            loss = closure()  # a line search may evaluate more than once
            self.opt.step()
            events.append(f"took {step}")
            return loss

        def after_epoch(self, epoch):
            events.append(f"epoch {epoch}")

        @contextlib.contextmanager
        def evaluation(self, model):
            saved = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()  # an all-zero model predicts class 0 for every signal
            events.append("eval")
            try:
                yield
            finally:
                with torch.no_grad():
                    for p, s in zip(model.parameters(), saved, strict=True):
                        p.copy_(s)

    model = models.build_model("mlp")
    r = demo.train(model, mnist, method=Hooked(), epochs=1, batch_size=256, progress=False)
    assert events == ["took 2", "took 4", "epoch 1", "eval"]
    frac0 = float((mnist.y_test == 0).float().mean())
    assert r.test_accuracy == pytest.approx(frac0)  # evaluated with the swapped-in weights
    assert any(float(p.detach().abs().sum()) > 0 for p in model.parameters())  # and swapped back

    class Cheat(Hooked):
        def take_step(self, step, closure):
            return torch.zeros(())  # a step without ever calling the closure

    with pytest.raises(RuntimeError, match="without calling the closure"):
        demo.train(models.build_model("mlp"), mnist, method=Cheat(), epochs=1, progress=False)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_train_is_deterministic_for_a_seed(name, mnist):
    kwargs = dict(epochs=2, batch_size=128, lr=2e-3, seed=5, progress=False)
    r1 = demo.train(models.build_model(name, seed=5), mnist, **kwargs)
    r2 = demo.train(models.build_model(name, seed=5), mnist, **kwargs)
    assert r1.test_accuracy == r2.test_accuracy
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    assert len(r1.history) == 2
    assert r1.trainable_share == 1.0
    assert r1.trainable_params == r1.dense_params
    assert r1.wall_time_s > 0
    assert r1.test_accuracy > 0.15  # it learns something in two epochs (chance: 0.1)


def test_train_with_sgd_and_step_schedule_runs(mnist):
    r = demo.train(
        models.build_model("mlp"),
        mnist,
        epochs=2,
        batch_size=200,
        lr=0.05,
        optimizer="sgd",
        schedule="step",
        progress=False,
    )
    assert 0.0 <= r.test_accuracy <= 1.0
    assert r.history[-1]["lr"] == pytest.approx(0.05 * 0.01)
    with pytest.raises(ValueError, match="optimizer"):
        demo.train(models.build_model("mlp"), mnist, epochs=1, optimizer="lbfgs", progress=False)


def test_cli_quick_dense_prints_a_table_with_every_model(capsys, tmp_path):
    path = tmp_path / "out" / "results.json"
    rc = cli.main(["--quick", "--methods", "dense", "--no-progress", "--json", str(path)])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert "test acc %" in lines[header]
    assert "trainable %" in lines[header]
    rows = lines[header + 2 : header + 2 + len(models.MODELS)]
    assert [r.split()[:2] for r in rows] == [[m, "dense"] for m in models.MODELS]
    assert all(" 100.0 " in r for r in rows)
    report = json.loads(path.read_text())
    assert [r["model"] for r in report["results"]] == list(models.MODELS)
    assert report["dataset"]["num_samples"] == cli.QUICK["num_samples"]
    assert report["settings"]["cnn"]["epochs"] == cli.QUICK["epochs"]


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        cli.parse_args(["--models", "mlp,resnet"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "dense,nope"])


def test_oialr_method_runs_when_available(mnist):
    try:
        method = methods.make_method("oialr", switch_at=0.25, update_every_epochs=0.5)
    except methods.MethodUnavailable as exc:
        pytest.skip(str(exc))
    r = demo.train(
        models.build_model("mlp"), mnist, method=method, epochs=2, batch_size=64, progress=False
    )
    assert 0.0 < r.trainable_share < 1.0
    assert r.trainable_params < r.dense_params


def test_cli_defaults_to_one_thread_and_names_itself(monkeypatch):
    """One thread by default (the shared-machine collapse of torch's default); usage says the command."""
    assert cli.parse_args([]).threads == 1
    assert cli.parse_args(["--threads", "2"]).threads == 2
    monkeypatch.setattr(cli.sys, "argv", ["/venv/bin/lowrank-compare", "--help"])
    assert cli._prog() == "lowrank-compare"
    monkeypatch.setattr(cli.sys, "argv", ["/x/lowrank_torch/demo/__main__.py"])
    assert cli._prog() == "python -m lowrank_torch.demo"
