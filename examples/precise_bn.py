"""PreciseBN on MNIST-1D: stale running statistics after averaging weights, and the exact fix.

An exponential moving average of the parameters (EMA, as in Polyak averaging or the "model EMA"
of image classifiers) is usually better than the last weights, but the running statistics of
its batch norms were collected for other weights: the last ones, and the ones before. This
script trains the MNIST-1D CNN with jaxnorm's BatchNorm and an EMA of its parameters, then
evaluates the EMA weights on held-out data with

- the stale running statistics (from training),
- statistics recomputed exactly with ``jaxnorm.linen.recompute_batch_stats`` (one pass over the
  training set, model in training mode, count-weighted merge),
- the naive way: the average of each batch's mean and variance (fvcore's ``update_bn_stats``,
  ``torch.optim.swa_utils.update_bn``),

each over shuffled batches of the training set and over the same data read in class order (a
stream sorted by label, as data sharded by class or by time arrives). In training mode every
norm after the first sees inputs that depend on the batch it came in, so only the first norm's
statistics are a property of the data alone: there, the exact ones do not depend on the order,
and the average of per-batch variances misses the spread between batches.

Run: python examples/precise_bn.py [--quick] [--steps 3000]
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import jaxnorm.linen as jnn


def train_with_ema(model: nn.Module, data: dict, *, steps: int, batch_size: int,
                   learning_rate: float, ema_decay: float, seed: int = 0):
  """Adam on ``data``; returns the final variables and the EMA of the parameters."""
  x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
  # under jit: one compile, not one per operation
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(seed), x[:2],
                                                           train=False)
  params, stats = variables["params"], variables["batch_stats"]
  optimizer = optax.adam(learning_rate)
  index = jnp.asarray(common.batches(len(x), batch_size, steps, seed))

  def loss_fn(params, stats, idx):
    logits, updates = model.apply({"params": params, "batch_stats": stats}, x[idx], train=True,
                                  mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()
    return loss, updates["batch_stats"]

  def step(carry, idx):
    params, stats, opt_state, ema = carry
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, idx)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
    return (params, stats, opt_state, ema), None

  @jax.jit
  def run(carry, index):
    return jax.lax.scan(step, carry, index)[0]

  params, stats, _, ema = run((params, stats, optimizer.init(params), params), index)
  return {"params": params, "batch_stats": stats}, ema


def averaged_batch_stats(model: nn.Module, variables, batches):
  """The naive statistics: per layer, the mean over batches of each batch's mean and variance.

  Each norm's input is the output of the convolution before it, captured in training mode.
  """
  @jax.jit
  def norm_input_moments(x):
    _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda module, _: isinstance(module, nn.Conv))
    inputs = [state["intermediates"][f"Conv_{i}"]["__call__"][0] for i in range(3)]
    return [(h.mean((0, 1)), h.var((0, 1), ddof=1)) for h in inputs]

  sums = None
  for x in batches:
    per_batch = norm_input_moments(x)
    sums = per_batch if sums is None else jax.tree.map(jnp.add, sums, per_batch)
  stats = {f"BatchNorm_{i}": {"mean": m / len(batches), "var": v / len(batches)}
           for i, (m, v) in enumerate(sums)}
  return {**variables, "batch_stats": stats}


def relative_error(got, want) -> float:
  return float(jnp.max(jnp.abs(got - want) / jnp.abs(want)))


def study(*, steps: int, num_samples: int, batch_size: int = 16, recompute_batch: int = 200,
          learning_rate: float = 1e-2, ema_decay: float = 0.999):
  """Held-out accuracy of the last weights and of the EMA weights with each kind of statistics.

  Returns the accuracies by name, and the first norm's variance from each recomputation by
  (method, order): its input does not depend on the batches, so its exact statistics must not
  depend on their order either.
  """
  data = common.mnist1d(num_samples)
  model = common.CNN(norm="batch")
  last, ema_params = train_with_ema(model, data, steps=steps, batch_size=batch_size,
                                    learning_rate=learning_rate, ema_decay=ema_decay)
  x_test, y_test = jnp.asarray(data["x_test"]), jnp.asarray(data["y_test"])
  evaluate = jax.jit(lambda variables: model.apply(variables, x_test, train=False))

  def accuracy(variables) -> float:
    return float(jnp.mean(jnp.argmax(evaluate(variables), -1) == y_test))

  ema = {"params": ema_params, "batch_stats": last["batch_stats"]}
  x = np.asarray(data["x"])
  shuffled = np.random.default_rng(1).permutation(len(x))
  by_class = np.argsort(data["y"], kind="stable")
  results = {"last weights, running statistics": accuracy(last),
             "EMA weights, stale running statistics": accuracy(ema)}
  first_var = {}
  for order_name, order in (("shuffled", shuffled), ("class order", by_class)):
    batches = [jnp.asarray(x[order[i:i + recompute_batch]])
               for i in range(0, len(x), recompute_batch)]
    exact = jnn.recompute_batch_stats(model, ema, batches, train=False)
    naive = averaged_batch_stats(model, ema, batches)
    results[f"EMA weights, recomputed exactly ({order_name})"] = accuracy(exact)
    results[f"EMA weights, average of per-batch statistics ({order_name})"] = accuracy(naive)
    for method, variables in (("exact", exact), ("average", naive)):
      first_var[method, order_name] = variables["batch_stats"]["BatchNorm_0"]["var"]
  return results, first_var


def table(results: dict[str, float]) -> str:
  lines = ["| weights and batch-norm statistics | held-out accuracy |", "|---|---|"]
  lines += [f"| {name} | {100 * value:.1f}% |" for name, value in results.items()]
  return "\n".join(lines)


def main(argv=None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps, for the test suite")
  parser.add_argument("--steps", type=int, default=3000)
  args = parser.parse_args(argv)
  if args.quick:
    results, first_var = study(steps=30, num_samples=600, recompute_batch=100)
  else:
    results, first_var = study(steps=args.steps, num_samples=5000)
  print(table(results))
  exact = first_var["exact", "shuffled"]
  print("\nfirst norm's variance: largest relative difference from the exact one (shuffled)")
  for method, order in (("exact", "class order"), ("average", "shuffled"),
                        ("average", "class order")):
    label = "exact" if method == "exact" else "average of per-batch values"
    print(f"  {label}, {order}: {relative_error(first_var[method, order], exact):.1e}")
  return results


if __name__ == "__main__":
  main()
