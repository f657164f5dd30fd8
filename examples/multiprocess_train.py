"""Synchronized BatchNorm across processes with ``jax.distributed``: a script to copy.

  python examples/multiprocess_train.py [--quick]     # 2 local processes, 2 CPU devices each
  python examples/multiprocess_train.py --coordinator HOST:PORT --num-processes N --process-id I

The second form runs one process of a job: once per host (or per GPU), with process 0's address.
Each process joins, builds a mesh of every process's devices, feeds its own rows of each global
batch and trains a Flax model with ``jaxnorm.linen.BatchNorm`` under ``jax.shard_map`` with
``axis_name``, and under ``jax.jit`` on sharded global arrays without it, on full batches and on
masked ones where a process holds no valid row at some steps. Both ways give the same model.
"""
from __future__ import annotations

import argparse
import functools
import socket
import subprocess
import sys
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jnn

AXIS = "batch"
FEATURES = 6


class Config(NamedTuple):
  num_processes: int
  devices_per_process: int
  rows_per_device: int = 8
  steps: int = 20
  hidden: int = 16
  learning_rate: float = 0.05
  seed: int = 0


class Net(nn.Module):
  """BatchNorm on the inputs, a hidden layer with BatchNorm, a linear output."""
  hidden: int = 16
  axis_name: str | None = None
  norm: Any = jnn.BatchNorm  # any layer with flax.linen.BatchNorm's arguments

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    norm = functools.partial(self.norm, use_running_average=not train, momentum=0.9,
                             axis_name=self.axis_name)
    x = nn.Dense(self.hidden)(norm()(x, mask=mask))
    return nn.Dense(1)(nn.relu(norm()(x, mask=mask)))


def global_batches(config: Config, masked: bool) -> dict[str, np.ndarray]:
  """x, y and weight (1: a valid row) of each step's global batch, the same on every process.

  Device d holds rows [d * rows_per_device, (d + 1) * rows_per_device), devices numbered process
  by process. Masked: 0 to all valid rows a device, none on one process at even steps.
  """
  rng = np.random.default_rng(config.seed)
  devices, rows = config.num_processes * config.devices_per_process, config.rows_per_device
  x = rng.standard_normal((config.steps, devices * rows, FEATURES)) * 3 + 50  # far from zero
  y = (x - 50) @ rng.standard_normal((FEATURES, 1)) / 3
  weight = np.ones(x.shape[:2])
  for step in range(config.steps if masked else 0):
    counts = rng.integers(0, rows + 1, devices)
    if step % 2 == 0:
      empty = step // 2 % config.num_processes
      counts[empty * config.devices_per_process:(empty + 1) * config.devices_per_process] = 0
    if counts.sum() < 2:
      counts[-1] = rows
    weight[step] = (np.arange(rows) < counts[:, None]).ravel()
    x[step, weight[step] == 0] = 1e4
  return {k: v.astype(np.float32) for k, v in {"x": x, "y": y, "weight": weight}.items()}


def make_step(config: Config, mesh, variant: str, masked: bool, norm=jnn.BatchNorm):
  """A jitted training step, and the (params, batch_stats, opt_state) it starts from.

  ``shard_map``: the model with ``axis_name``, on each device's rows. ``jit``: the model without
  it, on global arrays sharded over the mesh (or on one device's arrays).
  """
  model = Net(config.hidden, AXIS if variant == "shard_map" else None, norm)
  optimizer = optax.sgd(config.learning_rate, momentum=0.9)
  variables = model.init(jax.random.key(config.seed), np.zeros((2, FEATURES), np.float32),
                         train=False)
  state = (variables["params"], variables.get("batch_stats", {}),
           optimizer.init(variables["params"]))

  def loss_fn(params, batch_stats, x, y, weight):
    pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mask=weight[:, None] > 0 if masked else None,
                                mutable=["batch_stats"])
    total, count = jnp.sum(weight[:, None] * jnp.square(pred - y)), jnp.sum(weight)
    if variant == "shard_map":
      total, count = jax.lax.psum((total, count), AXIS)
    return total / jnp.maximum(count, 1), updates.get("batch_stats", {})

  if variant == "shard_map":
    loss_fn = jax.shard_map(loss_fn, mesh=mesh, out_specs=(P(), P()),
                            in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)))

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, weight):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y, weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss
  return step, jax.tree.map(np.asarray, state)


def train(config: Config, mesh, variant: str, masked: bool) -> tuple[dict, np.ndarray]:
  """Trains on every global batch, this process feeding its own rows: (variables, losses)."""
  data, rows = global_batches(config, masked), config.devices_per_process * config.rows_per_device
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  step, state = make_step(config, mesh, variant, masked)
  batch = NamedSharding(mesh, P(AXIS))
  params, batch_stats, opt_state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated
  losses = []
  for i in range(config.steps):
    x, y, weight = (jax.make_array_from_process_local_data(batch, data[key][i][mine])
                    for key in ("x", "y", "weight"))
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y, weight)
    losses.append(float(loss.addressable_data(0)))
  variables = {"params": params, "batch_stats": batch_stats}
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), variables), np.array(losses)


def main(args: argparse.Namespace) -> int:
  """One process of the job: joins it, then trains both ways on full and on masked batches."""
  if args.cpu_devices:  # host CPU devices with gloo collectives; leave out on GPU and TPU hosts
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Every wait is bounded: all peers must join within 60 s, and a peer without a heartbeat for
  # 30 s (a crash, a lost host) makes the others exit instead of hanging in a collective.
  jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             initialization_timeout=60, heartbeat_timeout_seconds=30)
  config = Config(jax.process_count(), jax.local_device_count(), steps=4 if args.quick else 20)
  mesh = Mesh(np.array(jax.devices()), (AXIS,), axis_types=(AxisType.Explicit,))
  for masked in (False, True):
    results = {variant: train(config, mesh, variant, masked) for variant in ("shard_map", "jit")}
    shard_map, jit = (jax.tree.leaves(result) for result in results.values())
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(shard_map, jit))
    print(f"process {jax.process_index()}, {'masked' if masked else 'full'} batches: losses "
          f"{np.round(results['jit'][1], 4).tolist()}; shard_map and jit differ by {gap:.1e}\n",
          end="", flush=True)  # one write: the processes share the terminal
  jax.distributed.shutdown()
  return 0


def launch(quick: bool) -> int:
  """Starts this script as 2 local processes over loopback; waits 10 minutes at most for each."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}",
                             "--num-processes", "2", "--process-id", str(i), "--cpu-devices", "2"]
                            + ["--quick"] * quick) for i in range(2)]
  try:
    return max(abs(proc.wait(timeout=600)) for proc in procs)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="4 steps instead of 20")
  parser.add_argument("--coordinator", help="host:port of process 0; without it, runs 2 locally")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--cpu-devices", type=int, default=0, help="run on this many CPU devices")
  args = parser.parse_args()
  sys.exit(main(args) if args.coordinator else launch(args.quick))
