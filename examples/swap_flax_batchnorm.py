"""Swap flax.linen.BatchNorm for jaxnorm.linen.BatchNorm in a trained model, keep its checkpoint.

A small residual CNN is trained for a few steps with flax's norms and saved with orbax. The same
model class, built with jaxnorm's norms, restores that checkpoint as it is (the variable tree is
the same: params/scale, params/bias, batch_stats/mean, batch_stats/var), gives the same
evaluation output, and trains on. Then a BatchNorm of each is fed data around 1e4, where flax's
fast variance breaks down and jaxnorm's does not.

Run: python examples/swap_flax_batchnorm.py [--quick]
"""
from __future__ import annotations

import argparse
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxnorm.linen as jnn


class ResidualCNN(nn.Module):
  """Two residual blocks of conv + norm + relu; ``norms`` is ``flax.linen`` or ``jaxnorm.linen``."""
  norms: Any = nn

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(16, (3, 3))(x)
    for _ in range(2):
      residual = x
      x = nn.Conv(16, (3, 3), use_bias=False)(x)
      x = self.norms.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
      x = nn.Conv(16, (3, 3), use_bias=False)(x)
      x = self.norms.GroupNorm(num_groups=4)(x)
      x = nn.relu(x + residual)
    x = self.norms.LayerNorm()(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(10)(x)


def train(model, variables, x, y, steps):
  """A few Adam steps; returns the new variables and the last loss."""
  optimizer = optax.adam(1e-2)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  for _ in range(steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
  return {"params": params, "batch_stats": batch_stats}, float(loss)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps, for the test suite")
  args = parser.parse_args(argv)
  steps = 3 if args.quick else 30
  rng = np.random.default_rng(0)
  x = rng.standard_normal((32, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 10, 32)

  flax_model, jaxnorm_model = ResidualCNN(norms=nn), ResidualCNN(norms=jnn)
  # init and apply under jit: one compile each, not one per operation
  variables = jax.jit(flax_model.init, static_argnames="train")(jax.random.key(0), x, train=False)
  variables, loss = train(flax_model, variables, x, y, steps)
  print(f"trained with flax.linen norms: loss {loss:.4f}")

  with tempfile.TemporaryDirectory() as directory:
    path = f"{directory}/checkpoint"
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path, variables)
    # The jaxnorm model's own (untrained) variables give the restore target: the same tree.
    target = jax.jit(jaxnorm_model.init, static_argnames="train")(jax.random.key(1), x,
                                                                  train=False)
    assert jax.tree.structure(target) == jax.tree.structure(variables)
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(path, target)

  flax_out = jax.jit(flax_model.apply, static_argnames="train")(variables, x, train=False)
  jaxnorm_out = jax.jit(jaxnorm_model.apply, static_argnames="train")(restored, x, train=False)
  difference = float(jnp.max(jnp.abs(flax_out - jaxnorm_out)))
  print(f"restored into jaxnorm.linen norms: max |output difference| {difference:.2e}")
  _, loss = train(jaxnorm_model, restored, x, y, steps)
  print(f"trained on with jaxnorm.linen norms: loss {loss:.4f}")

  # Activations far from zero: flax's fast variance breaks down, jaxnorm's does not.
  far = (rng.standard_normal((256, 16)) + 1e4).astype(np.float32)
  norm_std = {}
  for name, norms in (("flax", nn), ("jaxnorm", jnn)):
    layer = norms.BatchNorm(use_running_average=False)
    out, _ = jax.jit(lambda x, layer=layer: layer.apply(layer.init(jax.random.key(0), x), x,
                                                        mutable=["batch_stats"]))(far)
    norm_std[name] = float(jnp.std(out))
  print(f"BatchNorm output std on data around 1e4 (should be 1): flax "
        f"{norm_std['flax']:.3g}, jaxnorm {norm_std['jaxnorm']:.3g}")
  return {"difference": difference, "norm_std": norm_std}


if __name__ == "__main__":
  main()
