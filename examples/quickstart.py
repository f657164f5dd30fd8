"""Quickstart: jaxnorm's pure functions and a Flax model with jaxnorm.linen.BatchNorm.

Run: python examples/quickstart.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import flax.linen as nn

import jaxnorm
import jaxnorm.linen as jnn


def main():
  rng = np.random.default_rng(0)
  # Data far from zero: jaxnorm's statistics stay exact where E[x^2]-E[x]^2 fails.
  x = (rng.standard_normal((512, 8)) + 1e4).astype(np.float32)
  mean, var = jaxnorm.moments(x, axes=0)
  print("moments at offset 1e4: mean - 1e4 =", np.round(np.asarray(mean) - 1e4, 3))
  print("                       var        =", np.round(np.asarray(var), 3))
  y = jaxnorm.layer_norm(x.T)
  print("layer_norm output std per row:", np.round(np.asarray(y).std(axis=1)[:4], 4))

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(32)(x)
      x = jnn.BatchNorm(use_running_average=not train)(x)
      x = nn.relu(x)
      return nn.Dense(1)(x)

  # Standardize the inputs with their exact statistics, then train a model with BatchNorm.
  targets = (x - 1e4).sum(axis=1, keepdims=True)
  x = np.asarray(jaxnorm.normalize(x, mean, var))
  model = MLP()
  variables = model.init(jax.random.key(0), x[:2], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, xb, yb):
    def loss_fn(params):
      pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, xb,
                                  train=True, mutable=["batch_stats"])
      return jnp.mean((pred - yb) ** 2), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  for i in range(200):
    idx = rng.integers(0, len(x), 64)
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x[idx],
                                                targets[idx])
    if i % 50 == 0 or i == 199:
      print(f"step {i:3d}  train loss {float(loss):.4f}")
  pred = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
  print("eval loss with running statistics:", float(jnp.mean((pred - targets) ** 2)))


if __name__ == "__main__":
  main()
