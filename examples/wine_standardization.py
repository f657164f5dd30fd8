"""Why input statistics matter: an MLP on scikit-learn's wine data, with and without jaxnorm.

The 13 wine features range from about 0.1 (hue) to 1680 (proline). The same MLP is trained with
optax (SGD with momentum, full batch) on the raw features, and with a ``jaxnorm.linen.Standardize``
first layer holding the exact training-set statistics from ``jaxnorm.fit_stats``. Over a grid
of learning rates, the script reports the steps each needs to reach a target test accuracy, and
the largest learning rate at which training stays stable (finite loss, never above twice its
initial value, ending below it). Every learning rate and seed trains at once, under
``jax.vmap``, inside one ``lax.scan``.

Run: python examples/wine_standardization.py [--quick]
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

import jaxnorm
import jaxnorm.linen as jnn


class MLP(nn.Module):
  """Two hidden layers of 32 units; optionally a Standardize layer in front."""
  stats: jaxnorm.Stats | None = None

  @nn.compact
  def __call__(self, x):
    if self.stats is not None:
      x = jnn.Standardize(stats=self.stats)(x)
    x = nn.relu(nn.Dense(32)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(3)(x)


def wine(seed: int = 0) -> dict[str, np.ndarray]:
  """The wine data (bundled with scikit-learn), split 70/30, stratified."""
  x, y = load_wine(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x.astype(np.float32), y.astype(np.int32), test_size=0.3, stratify=y, random_state=seed)
  return {"x": x_train, "y": y_train, "x_test": x_test, "y_test": y_test}


def train_curves(model: MLP, data: dict[str, np.ndarray], learning_rates: np.ndarray,
                 steps: int, seeds: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray]:
  """Training loss and test accuracy after each step: arrays of shape (seed, learning rate, step).

  Every seed and learning rate trains at once (``jax.vmap`` over both) in one compiled program.
  """
  x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])

  def one_seed(key):
    variables = model.init(key, x[:1])
    constants = {k: v for k, v in variables.items() if k != "params"}  # input_stats, if any

    def loss_fn(params):
      logits = model.apply({"params": params, **constants}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def run(learning_rate):
      optimizer = optax.sgd(learning_rate, momentum=0.9)

      def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
        logits = model.apply({"params": params, **constants}, x_test)
        return (params, opt_state), (loss, jnp.mean(jnp.argmax(logits, -1) == y_test))

      params = variables["params"]
      _, curves = jax.lax.scan(step, (params, optimizer.init(params)), None, steps)
      return curves

    return jax.vmap(run)(jnp.asarray(learning_rates, jnp.float32))

  keys = jax.vmap(jax.random.key)(jnp.asarray(list(seeds)))
  losses, accuracies = jax.jit(jax.vmap(one_seed))(keys)
  return np.asarray(losses), np.asarray(accuracies)


def summarize(losses: np.ndarray, accuracies: np.ndarray, target: float):
  """Per learning rate: steps to reach ``target`` (None if never), final accuracy, stability.

  A run is stable where its training loss stays finite, never rises above twice its initial
  value, and ends below it (a diverging run, or one whose units die in an early blow-up and
  then predict a constant, is not). Steps to the target count only for stable runs (an unstable
  run can pass the target by chance on its way).
  """
  initial = losses[:, :1]
  stable = (np.all(np.isfinite(losses), axis=1) & np.all(losses <= 2 * initial, axis=1)
            & (losses[:, -1] < initial[:, 0]))
  reached = (accuracies >= target) & stable[:, None]
  steps_to_target = [int(np.argmax(r)) + 1 if r.any() else None for r in reached]
  return steps_to_target, accuracies[:, -1], stable


def run(quick: bool = False, steps: int | None = None, seeds: int | None = None,
        target: float = 0.95) -> tuple[dict, dict]:
  """Trains both MLPs over the learning-rate grid and prints the table.

  Returns the summary per input (``"raw"``, ``"jaxnorm"``) and the curves: the learning rates
  and, per input, the training losses of shape (seed, learning rate, step).
  """
  steps = steps or (150 if quick else 1000)
  seeds = seeds or (1 if quick else 3)
  exponents = np.arange(-7, 1.01, 1.0 if quick else 0.5)
  learning_rates = 10.0 ** exponents

  data = wine()
  stats = jaxnorm.fit_stats(np.array_split(data["x"], 4))  # streamed, exact
  print(f"wine: {len(data['x'])} training and {len(data['x_test'])} test examples, "
        f"{stats.channels} features with means from {stats.mean.min():.3g} to "
        f"{stats.mean.max():.4g} and stds from {stats.std.min():.3g} to {stats.std.max():.4g}")
  print(f"MLP 13-32-32-3, SGD momentum 0.9, full batch, {steps} steps, {seeds} seed(s); "
        f"target test accuracy {target:.0%}")
  print("stable: training loss finite, never above twice its initial value and ending below "
        "it, for every seed;\nsteps: median over seeds of the first step at the target test "
        "accuracy (stable runs only); acc: final test accuracy (median)\n")

  results, curves = {}, {"learning_rates": learning_rates}
  for name, model in (("raw", MLP()), ("jaxnorm", MLP(stats=stats))):
    losses, accuracies = train_curves(model, data, learning_rates, steps, range(seeds))
    curves[name] = losses
    per_seed = [summarize(losses[s], accuracies[s], target) for s in range(seeds)]
    steps_to_target = [[s[0][i] for s in per_seed] for i in range(len(learning_rates))]
    results[name] = {
        # A learning rate counts as reaching the target where every seed does (median steps).
        "steps": [int(np.median(s)) if None not in s else None for s in steps_to_target],
        "accuracy": np.median([s[1] for s in per_seed], axis=0),
        "stable": np.all([s[2] for s in per_seed], axis=0),
    }

  header = (f"{'learning rate':>13} | {'raw: steps':>10} {'acc':>5} {'stable':>6} | "
            f"{'jaxnorm: steps':>14} {'acc':>5} {'stable':>6}")
  print(header)
  print("-" * len(header))
  for i, lr in enumerate(learning_rates):
    cells = []
    for name, width in (("raw", 10), ("jaxnorm", 14)):
      r = results[name]
      steps_text = "-" if r["steps"][i] is None else str(r["steps"][i])
      cells.append(f"{steps_text:>{width}} {r['accuracy'][i]:5.2f} "
                   f"{'yes' if r['stable'][i] else 'NO':>6}")
    print(f"{lr:13.1e} | {cells[0]} | {cells[1]}")

  print()
  summary = {}
  for name in ("raw", "jaxnorm"):
    r = results[name]
    reached = [(s, lr) for s, lr in zip(r["steps"], learning_rates) if s is not None]
    fewest = min(reached) if reached else None
    stable_rates = learning_rates[r["stable"]]
    largest = float(stable_rates.max()) if len(stable_rates) else None
    summary[name] = {"fewest_steps": None if fewest is None else fewest[0],
                     "at_learning_rate": None if fewest is None else float(fewest[1]),
                     "largest_stable_learning_rate": largest,
                     "best_accuracy": float(r["accuracy"].max())}
    fewest_text = ("never" if fewest is None else f"{fewest[0]} steps (learning rate "
                   f"{fewest[1]:.1e})")
    largest_text = "none" if largest is None else f"{largest:.1e}"
    print(f"{name:>8}: target reached in {fewest_text}; largest stable learning rate "
          f"{largest_text}; best test accuracy {r['accuracy'].max():.3f}")
  return summary, curves




def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a small run for tests")
  parser.add_argument("--steps", type=int, default=None, help="training steps (default 1000)")
  parser.add_argument("--target", type=float, default=0.95, help="target test accuracy")
  parser.add_argument("--seeds", type=int, default=None, help="initializations (default 3)")
  args = parser.parse_args(argv)
  return run(args.quick, args.steps, args.seeds, args.target)[0]


if __name__ == "__main__":
  main()
