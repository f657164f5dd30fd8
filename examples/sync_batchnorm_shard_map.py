"""Synchronized batch norm with ``jax.shard_map`` on 8 host devices, with unequal masks.

Each device holds 16 rows of the global batch, with a different number of valid (unpadded)
rows, one device none at all. ``jaxnorm.linen.BatchNorm(axis_name="data")`` pools the statistics
by count over the devices in one collective, so a training step under ``shard_map`` gives the
same parameters and running statistics as one device training on the valid rows of the whole
batch; a fully padded device contributes nothing and makes nothing NaN. The same model under
sharded ``jit`` needs no ``axis_name`` at all.

Run: python examples/sync_batchnorm_shard_map.py [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxnorm.linen as jnn  # noqa: E402


class MLP(nn.Module):
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, mask, train: bool):
    x = nn.Dense(32, use_bias=False)(x)
    x = jnn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x, mask=mask)
    return nn.Dense(1)(nn.relu(x))


def masked_loss(pred, target, mask, total):
  """Sum of squared errors over valid rows divided by the global count of valid rows."""
  return jnp.sum(jnp.where(mask, (pred - target) ** 2, 0)) / total


def make_step(model, optimizer, total, axis_name=None):
  def step(variables, opt_state, x, target, mask):
    def loss_fn(params):
      pred, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, mask, train=True, mutable=["batch_stats"])
      return masked_loss(pred, target, mask, total), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    # Under shard_map, the gradient of replicated parameters is already summed over devices
    # (the transpose of their implicit broadcast); each device holds part of the loss.
    if axis_name is not None:
      loss = jax.lax.psum(loss, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(variables["params"], updates)
    return {"params": params, "batch_stats": batch_stats}, opt_state, loss
  return step


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps, for the test suite")
  args = parser.parse_args(argv)
  steps = 3 if args.quick else 20
  devices = np.array(jax.devices()[:8])
  if len(devices) < 8:
    raise SystemExit(f"needs 8 devices, found {len(devices)}: set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count=8 before JAX starts")
  rng = np.random.default_rng(0)
  rows = 16
  x = (rng.standard_normal((8 * rows, 4)) * 3 + 100).astype(np.float32)
  target = x.sum(axis=1, keepdims=True) - 400
  valid_rows = np.array([16, 12, 9, 5, 3, 1, 1, 0])  # per device; the last is all padding
  mask = (np.arange(rows)[None, :] < valid_rows[:, None]).reshape(-1, 1)
  total = float(mask.sum())

  optimizer = optax.sgd(0.01)
  single, synced = MLP(), MLP(axis_name="data")
  variables = single.init(jax.random.key(0), x[:2], mask[:2], train=False)

  # The reference: one device, the valid rows of the whole batch.
  valid = mask[:, 0]
  reference_step = jax.jit(make_step(single, optimizer, total))
  reference, opt_state = variables, optimizer.init(variables["params"])
  for _ in range(steps):
    reference, opt_state, loss = reference_step(reference, opt_state, x[valid], target[valid],
                                                mask[valid])
  print(f"one device, valid rows only: loss {float(loss):.5f}")

  mesh = Mesh(devices, ("data",))
  replicated, sharded = P(), P("data")
  step = jax.jit(jax.shard_map(
      make_step(synced, optimizer, total, axis_name="data"), mesh=mesh,
      in_specs=(replicated, replicated, sharded, sharded, sharded),
      out_specs=(replicated, replicated, replicated)))
  shard_mapped, opt_state = variables, optimizer.init(variables["params"])
  for _ in range(steps):
    shard_mapped, opt_state, loss = step(shard_mapped, opt_state, x, target, mask)
  print(f"shard_map over 8 devices:    loss {float(loss):.5f}")

  put = lambda a: jax.device_put(a, NamedSharding(mesh, sharded))  # noqa: E731
  jit_step = jax.jit(make_step(single, optimizer, total))
  sharded_jit, opt_state = variables, optimizer.init(variables["params"])
  for _ in range(steps):
    sharded_jit, opt_state, loss = jit_step(sharded_jit, opt_state, put(x), put(target),
                                            put(mask))
  print(f"sharded jit, no axis_name:   loss {float(loss):.5f}")

  differences = {}
  for name, result in (("shard_map", shard_mapped), ("sharded jit", sharded_jit)):
    leaves = zip(jax.tree.leaves(result), jax.tree.leaves(reference))
    differences[name] = max(float(jnp.max(jnp.abs(a - b) / (1 + jnp.abs(b)))) for a, b in leaves)
    print(f"{name}: largest relative difference from the one-device reference over params and "
          f"running statistics {differences[name]:.2e}")
  running_mean = np.asarray(shard_mapped["batch_stats"]["BatchNorm_0"]["mean"])
  print("running mean finite:", bool(np.isfinite(running_mean).all()))
  return differences


if __name__ == "__main__":
  main()
