"""Small and non-i.i.d. batches on MNIST-1D: BatchNorm, BatchRenorm and ghost batch norm.

Batch norm trains on statistics of the batch and evaluates with moving averages. With micro-
batches of 2 or 4 examples, or with batches that each hold one class, the two disagree and
held-out accuracy falls. Batch Renormalization (Ioffe 2017) corrects the training output
towards the moving averages; ghost batch norm (Hoffer et al. 2017) takes the statistics over
virtual batches inside a larger batch, which isolates the effect of the statistics' size from
that of the gradient's.

Settings (each trains for the same number of examples):

- ``i.i.d. 32``: shuffled batches of 32, the usual case, for reference.
- ``micro 4``, ``micro 2``: batches of 4 or 2 examples.
- ``sorted 32``: each epoch sorted by class, cut into batches of 32, batch order shuffled:
  nearly every batch holds a single class (a harsher non-i.i.d. case than Ioffe 2017's).

Ghost batch norm always steps on batches of 32 and normalizes virtual batches of 8 (i.i.d.,
sorted), 4 or 2 (micro): the statistics of the micro-batches with the gradient of 32 examples,
what data-parallel training with 4 or 2 examples per device computes.

GroupNorm, which uses no batch statistics, is the reference any batch-dependent norm should
reach. The model is the MNIST-1D baseline CNN (Greydanus 2020: three convolutions and a linear
head) with the norm after each convolution; MNIST-1D comes from the ``mnist1d`` package's
generator, nothing is downloaded. Training runs as ``jax.lax.scan`` under ``jit``; held-out
accuracy uses the running statistics, mean and spread over seeds.

Run: python examples/small_batches.py [--quick] [--seeds 3] [--epochs 12]
"""
from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxnorm
import jaxnorm.linen as jnn
from common import mnist1d

METHODS = ("BatchNorm", "BatchRenorm", "GhostBatchNorm", "GroupNorm")


class Setting(NamedTuple):
  """How batches are drawn: their size and order, and ghost batch norm's batch and split."""
  batch: int
  order: str            # "shuffled" or "sorted" (by class)
  ghost_batch: int
  ghost_virtual: int


SETTINGS = {
    "i.i.d. 32": Setting(32, "shuffled", 32, 8),
    "micro 4": Setting(4, "shuffled", 32, 4),
    "micro 2": Setting(2, "shuffled", 32, 2),
    "sorted 32": Setting(32, "sorted", 32, 8),
}


def norm_layer(method: str, train: bool, *, stats_batch: int, step_batch: int,
               schedule: jaxnorm.RenormSchedule):
  """The norm of ``method`` for (batch, length, channels) activations."""
  if method == "BatchNorm":
    return jnn.BatchNorm(use_running_average=not train)
  if method == "BatchRenorm":
    return jnn.BatchRenorm(use_running_average=not train, rmax=schedule.rmax, dmax=schedule.dmax)
  if method == "GhostBatchNorm":
    return jnn.GhostBatchNorm(use_running_average=not train, virtual_batch_size=stats_batch)
  if method == "GroupNorm":
    return jnn.GroupNorm(num_groups=8)
  raise ValueError(f"method={method!r} is not one of {METHODS}")


class CNN(nn.Module):
  """The MNIST-1D baseline CNN (Greydanus 2020) with a norm after each convolution."""
  method: str
  stats_batch: int
  step_batch: int
  schedule: jaxnorm.RenormSchedule
  channels: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    for kernel in (5, 3, 3):
      x = nn.Conv(self.channels, (kernel,), strides=2, use_bias=False)(x)
      x = norm_layer(self.method, train, stats_batch=self.stats_batch,
                     step_batch=self.step_batch, schedule=self.schedule)(x)
      x = nn.relu(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def batch_indices(labels: np.ndarray, batch_size: int, steps: int, order: str,
                  rng: np.random.Generator) -> np.ndarray:
  """``steps`` batches of indices: shuffled epochs, or epochs sorted by class, batches shuffled."""
  per_epoch = len(labels) // batch_size
  rows = []
  while len(rows) * per_epoch < steps:
    perm = rng.permutation(len(labels))
    if order == "sorted":
      perm = perm[np.argsort(labels[perm], kind="stable")]
    epoch = perm[:per_epoch * batch_size].reshape(per_epoch, batch_size)
    if order == "sorted":
      epoch = epoch[rng.permutation(per_epoch)]
    rows.append(epoch)
  return np.concatenate(rows)[:steps]


def train_and_evaluate(data: dict, method: str, setting: str, *, epochs: float,
                       seeds: int) -> list[float]:
  """Held-out accuracy (running statistics) after ``epochs`` epochs of Adam, for each seed.

  One compilation serves every seed: only the initial parameters and the batches change.
  """
  setting = SETTINGS[setting]
  if method == "GhostBatchNorm":
    step_batch, stats_batch = setting.ghost_batch, setting.ghost_virtual
  else:
    step_batch = stats_batch = setting.batch
  steps = int(epochs * len(data["x"]) / step_batch)
  # Ioffe (2017): batch norm for a warm-up, then rmax and dmax relaxed; here in proportion.
  schedule = jaxnorm.renorm_schedule(warmup_steps=steps // 20, relax_steps=steps // 4)
  model = CNN(method, stats_batch, step_batch, schedule)
  x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
  learning_rate = 3e-3 * (step_batch / 32) ** 0.5
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(params, state, idx):
    logits, updates = model.apply({"params": params, **state}, x[idx], train=True,
                                  mutable=list(state))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean(), updates

  def step(carry, idx):
    params, state, opt_state = carry
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, idx)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), state, opt_state), loss

  @jax.jit
  def train_and_test(key, index):
    variables = model.init(key, x[:2], train=False)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    carry = (params, state, optimizer.init(params))
    (params, state, _), _ = jax.lax.scan(step, carry, index)
    logits = model.apply({"params": params, **state}, jnp.asarray(data["x_test"]), train=False)
    return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(data["y_test"]))

  accuracies = []
  for seed in range(seeds):
    index = batch_indices(data["y"], step_batch, steps, setting.order,
                          np.random.default_rng(seed))
    accuracies.append(float(train_and_test(jax.random.key(seed), jnp.asarray(index))))
  return accuracies


def study(*, epochs: float, seeds: int, num_samples: int, settings=tuple(SETTINGS),
          methods=METHODS, log=print) -> dict:
  """{setting: {method: [accuracy per seed]}}."""
  data = mnist1d(num_samples)
  results = {s: {} for s in settings}
  for setting in settings:
    for method in methods:
      start = time.perf_counter()
      results[setting][method] = train_and_evaluate(data, method, setting, epochs=epochs,
                                                    seeds=seeds)
      accuracies = 100 * np.array(results[setting][method])
      log(f"  {setting:10s} {method:15s} {accuracies.mean():5.1f}%  "
          f"({time.perf_counter() - start:.1f} s)")
  return results


def table(results: dict, seeds: int) -> str:
  """A markdown table of held-out accuracy, mean ± standard deviation over seeds."""
  methods = list(next(iter(results.values())))
  lines = ["| setting | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
  for setting, by_method in results.items():
    cells = []
    for method in methods:
      accuracies = 100 * np.array(by_method[method])
      spread = f" ± {accuracies.std(ddof=1):.1f}" if seeds > 1 else ""
      cells.append(f"{accuracies.mean():.1f}{spread}")
    lines.append(f"| {setting} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a tiny run, for the test suite")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=float, default=12)
  parser.add_argument("--samples", type=int, default=5000, help="MNIST-1D examples (80% train)")
  args = parser.parse_args(argv)
  settings, methods = tuple(SETTINGS), METHODS
  if args.quick:  # a smoke test: one setting, the three batch norms, a fraction of an epoch
    args.seeds, args.epochs, args.samples = 1, 0.2, 500
    settings, methods = ("sorted 32",), METHODS[:3]
  start = time.perf_counter()
  print(f"MNIST-1D, {args.samples} examples, {args.epochs:g} epochs, {args.seeds} seed(s)")
  results = study(epochs=args.epochs, seeds=args.seeds, num_samples=args.samples,
                  settings=settings, methods=methods)
  print()
  print(table(results, args.seeds))
  ghost = ", ".join(f"{SETTINGS[name].ghost_virtual} ({name})" for name in settings)
  print(f"\nheld-out accuracy (%) with the running statistics, over {args.seeds} seed(s); "
        f"ghost batch norm: batches of 32 in virtual batches of {ghost}; "
        f"{time.perf_counter() - start:.0f} s")
  return results


if __name__ == "__main__":
  main()
