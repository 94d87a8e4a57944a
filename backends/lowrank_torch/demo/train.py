"""One training loop for every model and method of the demo, deterministic for a given seed."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data import MNIST1D
from .methods import Dense, Method
from .models import count_params

__all__ = [
    "DEFAULT_METHOD_OPTIONS",
    "DEFAULT_SETTINGS",
    "RunResult",
    "TrainSettings",
    "evaluate",
    "train",
]


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one run (the per-model defaults are :data:`DEFAULT_SETTINGS`)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # "cosine" (after a linear warm-up) or "step" (x0.1 at 50% and 75%)
    warmup_epochs: float = 1.0

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


# Tuned for dense training on MNIST-1D (8000 training signals, see the README's demo section).
DEFAULT_SETTINGS: dict[str, TrainSettings] = {
    "mlp": TrainSettings(epochs=30, batch_size=128, lr=1e-3, weight_decay=1e-2),
    "cnn": TrainSettings(epochs=20, batch_size=128, lr=2e-3, weight_decay=1e-2),
    "transformer": TrainSettings(epochs=20, batch_size=128, lr=1e-3, weight_decay=5e-2),
}


# Method options that differ per model (everything else: the method's own defaults). OIALR's sigma
# cutoff: the transformer's layers have flat spectra, so a cutoff of 0.1 keeps nearly full rank (32%
# of the dense parameters, no saving on its square layers); 0.3 brings it to ~18% at no accuracy cost.
# The MLP loses accuracy above 0.1 (72.25% at 0.15 vs 73.0% at 0.1; MNIST-1D, seed 0).
DEFAULT_METHOD_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("transformer", "oialr"): {"fraction": 0.3},
}


@dataclass
class RunResult:
    """What one run reports."""

    test_accuracy: float  # in [0, 1], after the last epoch
    trainable_params: int  # trainable scalars at the end, as the method counts them
    dense_params: int  # trainable scalars of the dense model before training
    trainable_share: float  # trainable_params / dense_params
    wall_time_s: float  # the whole run: setup, training and the per-epoch evaluations
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per epoch

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    correct = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            target = y[i : i + batch_size]
            loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    n = max(1, int(x.shape[0]))
    return loss_sum / n, correct / n


def _optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'sgd'")


def _lr_factor(schedule: str, total: int, warmup: int) -> Any:
    if schedule == "cosine":

        def cosine(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return cosine
    if schedule == "step":

        def stepwise(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))

        return stepwise
    raise ValueError(f"unknown schedule {schedule!r}; choose 'cosine' or 'step'")


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no tqdm: train without a bar
        return None
    # disable=None: tqdm turns itself off when stderr is not a terminal.
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)


_WARM = False


def _warm_up() -> None:
    """Build one throw-away optimizer, so torch's one-time lazy imports (about a second, the first
    time an optimizer is built in a process) are not billed to whichever run comes first."""
    global _WARM
    if not _WARM:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
        _WARM = True


def train(
    model: nn.Module,
    data: MNIST1D,
    *,
    method: Method | None = None,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    weight_decay: float = 1e-2,
    optimizer: str = "adamw",
    schedule: str = "cosine",
    warmup_epochs: float = 1.0,
    desc: str | None = None,
) -> RunResult:
    """Train ``model`` on ``data.x_train`` with ``method`` (default :class:`~.methods.Dense`).

    Deterministic for a given ``seed`` (and model initialization): the global torch generator is
    seeded (dropout), and each epoch's shuffle is drawn from a private ``torch.Generator``. The
    optimizer (``"adamw"`` or ``"sgd"``) is built from ``model.parameters()`` before
    ``method.setup``; the learning rate follows ``schedule`` per step. After every epoch the model is
    evaluated on the test set (eval mode, no gradients) and a history entry is recorded.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be >= 1, got {epochs}, {batch_size}")
    method = Dense() if method is None else method
    _warm_up()
    start = time.perf_counter()
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    n = int(x.shape[0])
    steps_per_epoch = math.ceil(n / batch_size)
    total = steps_per_epoch * epochs
    dense_params = count_params(model)

    opt = _optimizer(model, optimizer, lr, weight_decay)
    warmup = min(total, max(1, round(warmup_epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, total, warmup))
    method.setup(model, opt, steps_per_epoch, epochs)

    # Optional hooks (see methods.Method): a method may take the optimizer step itself, act after
    # each epoch, or have the test set evaluated with other weights swapped in.
    take_step = getattr(method, "take_step", None)
    after_epoch = getattr(method, "after_epoch", None)
    evaluation = getattr(method, "evaluation", None)

    bar = _progress_bar(total, desc or method.name, progress)
    history: list[dict[str, float]] = []
    step = 0
    test_acc = 0.0
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(n, generator=shuffle)
            loss_sum = torch.zeros(())
            correct = torch.zeros((), dtype=torch.int64)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                xb, yb = x[idx], y[idx]
                last: dict[str, Tensor] = {}

                def closure(
                    xb: Tensor = xb, yb: Tensor = yb, last: dict[str, Tensor] = last
                ) -> Tensor:
                    # torch.optim.LBFGS-style: fresh gradients of this batch's loss, loss returned.
                    model.zero_grad(set_to_none=True)
                    logits = model(xb)
                    loss = nn.functional.cross_entropy(logits, yb)
                    torch.autograd.backward(loss)
                    if "logits" not in last:  # the first evaluation, at the weights before the step
                        last["logits"], last["loss"] = logits.detach(), loss.detach()
                    return loss

                taken = take_step(step + 1, closure) if take_step is not None else None
                if taken is None:  # the plain step: one gradient, one optimizer.step()
                    closure()
                    opt.step()
                elif "logits" not in last:
                    raise RuntimeError(
                        f"method {method.name!r}: take_step() took a step without calling the closure"
                    )
                sched.step()
                step += 1
                method.after_step(step)
                with torch.no_grad():
                    loss_sum += last["loss"] * idx.numel()
                    correct += (last["logits"].argmax(dim=1) == yb).sum()
                if bar is not None:
                    bar.update(1)
            train_loss = float(loss_sum) / n
            train_acc = int(correct) / n
            if after_epoch is not None:
                after_epoch(epoch)
            if evaluation is not None:
                with evaluation(model):
                    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            else:
                test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
            share = method.trainable_share(model, dense_params)
            history.append(
                {
                    "epoch": float(epoch),
                    "train_loss": train_loss,
                    "train_accuracy": train_acc,
                    "test_loss": test_loss,
                    "test_accuracy": test_acc,
                    "trainable_share": share,
                    "lr": float(opt.param_groups[0]["lr"]),
                    "time_s": time.perf_counter() - start,
                }
            )
            if bar is not None:
                bar.set_postfix_str(
                    f"epoch {epoch}/{epochs} loss {train_loss:.3f} acc {train_acc:.3f} "
                    f"test {test_acc:.3f} share {share:.2f}",
                    refresh=True,
                )
    finally:
        if bar is not None:
            bar.close()
    share = method.trainable_share(model, dense_params)
    return RunResult(
        test_accuracy=test_acc,
        trainable_params=round(share * dense_params),
        dense_params=dense_params,
        trainable_share=share,
        wall_time_s=time.perf_counter() - start,
        history=history,
    )
