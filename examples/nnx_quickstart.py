"""jaxnorm with Flax NNX: scikit-learn's digits, standardized inputs, BatchNorm, nnx.Optimizer.

The 8x8 digit images (pixel values 0 to 16) are standardized inside the model by
``jaxnorm.nnx.Standardize`` with statistics fitted exactly over the training set
(``jaxnorm.fit_stats``); an MLP with ``jaxnorm.nnx.BatchNorm`` is trained with optax through
``nnx.Optimizer``; ``model.eval()`` switches BatchNorm to its running statistics. The fitted
statistics are ``InputStat`` variables: the optimizer skips them, checkpoints keep them.

Run: python examples/nnx_quickstart.py [--quick]
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxnorm
import jaxnorm.nnx as jnnx


class MLP(nnx.Module):
  def __init__(self, stats: jaxnorm.Stats, *, rngs: nnx.Rngs):
    self.standardize = jnnx.Standardize(stats)
    self.hidden = nnx.Linear(64, 128, use_bias=False, rngs=rngs)
    self.norm = jnnx.BatchNorm(128, rngs=rngs)       # drop-in for nnx.BatchNorm
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    x = self.standardize(x)
    return self.out(nnx.relu(self.norm(self.hidden(x))))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps, for the test suite")
  args = parser.parse_args(argv)
  steps = 30 if args.quick else 400
  x, y = load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = train_test_split(
      x.astype(np.float32), y, test_size=0.25, stratify=y, random_state=0)
  stats = jaxnorm.fit_stats(np.array_split(x_train, 8))    # streamed, exact
  model = MLP(stats, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, xb, yb):
    def loss_fn(model):
      logits = model(xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  model.train()
  for step in range(steps):
    index = rng.integers(0, len(x_train), 64)
    loss = train_step(model, optimizer, jnp.asarray(x_train[index]), jnp.asarray(y_train[index]))
    if step % 100 == 0 or step == steps - 1:
      print(f"step {step:3d}  train loss {float(loss):.4f}")
  model.eval()
  accuracy = float(jnp.mean(jnp.argmax(model(jnp.asarray(x_test)), -1) == y_test))
  print(f"held-out accuracy with running statistics: {accuracy:.3f}")
  return {"accuracy": accuracy, "loss": float(loss)}


if __name__ == "__main__":
  main()
