"""A 1-D CNN on MNIST-1D, trained with any jaxqp rules: shared by the quality benchmarks.

Every config trains the same model from the same initialisation on the same
batches; ``time_steps`` then times the configs' compiled steps round-robin so
that machine drift hits them alike.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxqp
from jaxqp.datasets import QUICK_SAMPLES, load_mnist1d


class CNN1D(nn.Module):
    """Three convolutions (32 filters, width 5, strides 1, 2, 2) and two Dense layers.

    jaxqp uses it unmodified; ``dot_general_cls`` / ``conv_general_dilated_cls``
    exist only so that a peer that needs them injected (AQT) can train the same
    network with the same parameter tree.
    """

    dot_general_cls: Any = None
    conv_general_dilated_cls: Any = None

    @nn.compact
    def __call__(self, x):
        def conv(name, strides=1):
            return nn.Conv(32, (5,), strides=(strides,), name=name,
                           conv_general_dilated_cls=self.conv_general_dilated_cls)

        x = x[..., None]
        x = nn.relu(conv("conv1")(x))
        x = nn.relu(conv("conv2", 2)(x))
        x = nn.relu(conv("conv3", 2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(128, name="fc", dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(10, name="head", dot_general_cls=self.dot_general_cls)(x)


class Run:
    """One config: its transform, optimizer, jitted step and training state."""

    def __init__(self, model, rules, params, lr: float, steps: int, learned_lr: float | None = None):
        self.model = model
        self.steps = steps
        self.t = jaxqp.transform(rules)
        schedule = optax.cosine_decay_schedule(lr, steps)
        learned_tx = None if learned_lr is None else optax.adam(learned_lr)
        self.tx = jaxqp.wrap(optax.adam(schedule), self.t, learned_tx=learned_tx)
        self.params, self.opt_state = params, self.tx.init(params)
        self.step = jax.jit(self._step)

    def forward(self, params, state, x):
        return jaxqp.linen_apply(self.model, state, {"params": self.t.apply(params, state)}, x)

    def _step(self, params, opt_state, x, y):
        def loss_fn(p, s):
            logits, observed = self.forward(p, s, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), observed

        state = jaxqp.state_of(opt_state)
        (loss, observed), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True, allow_int=True)(
            params, state)
        updates, opt_state = self.tx.update(grads, opt_state, params, observed=observed)
        return optax.apply_updates(params, updates), opt_state, loss

    def train(self, batches, label: str = "") -> None:
        """Runs the step on every batch, with a progress bar on a terminal (none in logs)."""
        for x, y in tqdm(batches, total=self.steps, desc=label, unit="step", disable=None, leave=False):
            self.params, self.opt_state, _ = self.step(self.params, self.opt_state, x, y)
        jax.block_until_ready(self.params)

    def evaluate(self, x, y) -> dict:
        logits, _ = jax.jit(self.forward)(self.params, jaxqp.state_of(self.opt_state), x)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return {"accuracy": float(jnp.mean(jnp.argmax(logits, -1) == y)), "nll": float(nll)}


def batches(x, y, steps: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(x), batch)
        yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def time_steps(runs: dict, x, y, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each run, timed in round-robin blocks (params keep training)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            params, opt_state = run.params, run.opt_state
            start = time.perf_counter()
            for _ in range(steps):
                params, opt_state, _ = run.step(params, opt_state, x, y)
            jax.block_until_ready(params)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def time_configs(runs: dict, x, y, batch: int, quick: bool) -> dict[str, float]:
    """``time_steps`` on one fixed batch: 15 rounds of 50 steps (2 of 5 with ``quick``)."""
    xb, yb = next(batches(x, y, 1, batch, seed=999))
    return time_steps(runs, xb, yb, steps=5 if quick else 50, repeats=2 if quick else 15)


def title(n_train: int, n_test: int, schedule: str, batch: int, seeds: int) -> str:
    """The first line of a quality table: data, protocol, machine, library version."""
    return (f"1-D CNN on MNIST-1D ({n_train} train / {n_test} test), {schedule} adam steps of {batch} "
            f"per config, mean (std) over {seeds} seeds; {jax.default_backend()} "
            f"({platform.processor() or platform.machine()}), jaxqp {jaxqp.__version__}")


def data(quick: bool = False):
    """MNIST-1D with 20000 samples (2000 with ``quick``: generating 20000 takes about 9 s)."""
    (x, y), (x_test, y_test) = load_mnist1d(QUICK_SAMPLES if quick else 20000)
    return (x, y), (jnp.asarray(x_test), jnp.asarray(y_test))


def summary_row(name: str, metrics: list[dict], step_s: float, float_step_s: float, seeds: int) -> dict:
    """Mean and std of accuracy (%) and NLL over seeds, and the step ratio to float."""
    acc = np.array([m["accuracy"] for m in metrics]) * 100
    nll = np.array([m["nll"] for m in metrics])
    return {"config": name, "accuracy": round(float(acc.mean()), 3), "nll": round(float(nll.mean()), 4),
            "accuracy_std": round(float(acc.std()), 3), "nll_std": round(float(nll.std()), 4),
            "step_ratio": round(step_s / float_step_s, 4), "step_ms": round(step_s * 1e3, 3), "seeds": seeds}


def format_row(row: dict, width: int) -> str:
    return (f"{row['config']:<{width}} {row['accuracy']:8.2f} ({row['accuracy_std']:4.2f}) "
            f"{row['nll']:9.4f} ({row['nll_std']:.4f})")
