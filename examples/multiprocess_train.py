"""Synchronized batch norm across real processes, with JAX's own multi-process runtime.

Run: python examples/multiprocess_train.py [--quick]

Starts ``--num-processes`` local processes (default 2) over loopback, each with
``--devices-per-process`` host CPU devices (default 2) and gloo collectives. Each process calls
``jax.distributed.initialize`` with the coordinator's address, holds its own slice of every
global batch, and trains a small Flax model with ``jaxnorm.linen.BatchNorm`` twice:

- ``shard_map``: ``BatchNorm(axis_name="batch")`` inside ``jax.shard_map``; each layer pools
  the count, mean and variance of every device with one all-gather.
- ``jit``: the same model without ``axis_name``, under ``jax.jit`` on global arrays sharded
  over a ``Mesh`` of every process's devices. On an Explicit mesh (``jax.make_mesh``'s
  default) each layer pools its shards' statistics with one all-gather too; with
  ``--axis-type auto`` XLA's partitioner reduces over the shards itself.

Each runs twice: on full batches, and on padded batches with masks, where the processes hold
unequal numbers of valid rows and one process's rows are all masked out at some steps. After
training, this launcher trains the same model in one process, on one device, on the valid rows
of every global batch concatenated, and prints how far the parameters and running statistics of
the distributed runs are from it: float32 rounding, nothing more.

Then each process fits the statistics of its own (unequal) part of a dataset with
``jaxnorm.fit_stats`` and ``jaxnorm.merge_across_processes`` merges them: every process gets
those of all the data, as one process fitting everything would.

The model code is the same on one device, on several devices and on several hosts. On GPU or
TPU hosts, start one process per host (or per GPU) with the coordinator's address; see
``initialize`` below. Every wait is bounded: initialization, the heartbeat that detects a dead
peer, shutdown and the launcher's wait for its workers.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jnn

AXIS = "batch"
VARIANTS = ("shard_map", "jit")
DATASETS = ("full", "masked")
FEATURES = 6
OFFSET = 50.0  # inputs far from zero: the statistics must stay exact there


class Config(NamedTuple):
  """What every process and the single-process reference agree on."""
  num_processes: int
  devices_per_process: int
  rows_per_device: int
  steps: int
  hidden: int
  learning_rate: float
  seed: int

  @property
  def num_devices(self) -> int:
    return self.num_processes * self.devices_per_process

  @property
  def global_rows(self) -> int:
    return self.num_devices * self.rows_per_device


class Net(nn.Module):
  """BatchNorm on the inputs, a hidden layer with BatchNorm, and a linear output.

  ``norm``: ``"jaxnorm"`` (``jaxnorm.linen.BatchNorm``); for timing only, ``"flax"``
  (``flax.linen.BatchNorm``, a pmean of per-device means) or ``"none"``.
  """
  hidden: int = 16
  axis_name: str | None = None
  norm: str = "jaxnorm"

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    layer = {"jaxnorm": jnn.BatchNorm, "flax": nn.BatchNorm}.get(self.norm)
    if layer is None:
      norm = lambda: lambda x, mask: x  # noqa: E731
    else:
      norm = functools.partial(layer, use_running_average=not train, momentum=0.9,
                               axis_name=self.axis_name)
    x = norm()(x, mask=mask)
    x = nn.Dense(self.hidden)(x)
    x = norm()(x, mask=mask)
    x = nn.relu(x)
    return nn.Dense(1)(x)


# ----------------------------------------------------------------------------------------------
# Data: the same global batches on every process, each process keeps its own rows.

def global_batches(config: Config, dataset: str) -> dict[str, np.ndarray]:
  """Every global batch: x (steps, rows, FEATURES), y (steps, rows, 1), valid (steps, rows).

  Rows ``[d * rows_per_device, (d + 1) * rows_per_device)`` belong to device ``d``; devices are
  numbered process by process. ``masked``: each device holds a random number of valid rows
  (0 to all); at even steps every row of process ``step // 2 % num_processes`` is masked out,
  and at least two rows are valid in all. Padding rows hold large values that must not matter.
  """
  rng = np.random.default_rng(config.seed)
  shape = (config.steps, config.global_rows)
  x = (rng.standard_normal(shape + (FEATURES,)) * 3 + OFFSET).astype(np.float32)
  coef = rng.standard_normal((FEATURES, 1))
  y = ((x - OFFSET) @ coef / 3 + 0.1 * rng.standard_normal(shape + (1,))).astype(np.float32)
  valid = np.ones(shape, bool)
  if dataset == "masked":
    rows = config.rows_per_device
    for step in range(config.steps):
      counts = rng.integers(0, rows + 1, config.num_devices)
      if step % 2 == 0:
        empty = (step // 2) % config.num_processes
        counts[empty * config.devices_per_process:(empty + 1) * config.devices_per_process] = 0
      if counts.sum() < 2:
        counts[-1] = rows
      valid[step] = (np.arange(rows)[None, :] < counts[:, None]).ravel()
      x[step][~valid[step]] = 1e4 * rng.standard_normal((int((~valid[step]).sum()), FEATURES))
  elif dataset != "full":
    raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}")
  return {"x": x, "y": y, "valid": valid}


def process_rows(config: Config, process_id: int) -> slice:
  """The rows of a global batch that ``process_id`` holds."""
  per_process = config.devices_per_process * config.rows_per_device
  return slice(process_id * per_process, (process_id + 1) * per_process)


# ----------------------------------------------------------------------------------------------
# Training: one step function, two ways of spreading it over devices.

def masked_mse(pred, y, weight):
  """The sum of squared errors over the rows of weight 1, and how many rows that is."""
  total = jnp.sum(weight[:, None] * jnp.square(pred - y))
  return total, jnp.sum(weight)


def make_loss(config: Config, variant: str, mesh, masked: bool, norm: str = "jaxnorm"):
  """loss(params, batch_stats, x, y, weight) -> (loss, new batch_stats), for ``variant``.

  ``jit`` (and the single-device reference): the model without ``axis_name``, on whole
  (possibly sharded) arrays. ``shard_map``: the model with ``axis_name``, run on each device's
  rows, the loss summed over devices with ``psum``.
  """

  def apply(model, params, batch_stats, x, y, weight):
    mask = weight[:, None] > 0 if masked else None
    pred, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mask=mask, mutable=["batch_stats"])
    total, count = masked_mse(pred, y, weight)
    return total, count, updates.get("batch_stats", {})

  if variant == "jit":
    model = Net(config.hidden, norm=norm)

    def loss(params, batch_stats, x, y, weight):
      total, count, batch_stats = apply(model, params, batch_stats, x, y, weight)
      return total / jnp.maximum(count, 1), batch_stats
    return loss

  if variant != "shard_map":
    raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
  model = Net(config.hidden, axis_name=AXIS, norm=norm)

  def per_device(params, batch_stats, x, y, weight):
    total, count, batch_stats = apply(model, params, batch_stats, x, y, weight)
    total, count = jax.lax.psum((total, count), AXIS)
    return total / jnp.maximum(count, 1), batch_stats

  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)),
                       out_specs=(P(), P()))


def make_step(loss_fn, optimizer):
  """A jitted training step: gradients of ``loss_fn``, one optimizer update."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, weight):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y, weight)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss
  return step


def initial_variables(config: Config, norm: str = "jaxnorm") -> dict[str, Any]:
  """The model's variables, the same on every process (host NumPy arrays)."""
  sample = np.zeros((2, FEATURES), np.float32)
  variables = Net(config.hidden, norm=norm).init(jax.random.key(config.seed), sample, train=False)
  return jax.tree.map(np.asarray, variables)


def optimizer_of(config: Config):
  return optax.sgd(config.learning_rate, momentum=0.9)


@functools.cache
def compiled_step_text(config: Config, variant: str, dataset: str, axis_type) -> str:
  """The whole training step (forward, backward, update) compiled on 8 host devices, as text.

  What the collective counts are read from (tests/test_multiprocess.py, benchmarks/scaling.py).
  """
  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,), axis_types=(axis_type,))
  data = global_batches(config, dataset)
  variables = initial_variables(config)
  optimizer = optimizer_of(config)
  step = make_step(make_loss(config, variant, mesh, masked=dataset == "masked"), optimizer)
  batch = NamedSharding(mesh, P(AXIS))
  x, y = jax.device_put(data["x"][0], batch), jax.device_put(data["y"][0], batch)
  weight = jax.device_put(data["valid"][0].astype(np.float32), batch)
  params = jax.device_put(variables["params"], NamedSharding(mesh, P()))
  lowered = step.lower(params, variables["batch_stats"], optimizer.init(params), x, y, weight)
  return lowered.compile().as_text()


def train_reference(config: Config, dataset: str) -> dict[str, Any]:
  """Trains on one device, on the valid rows of each global batch concatenated, without masks.

  Deterministic, so computed once per configuration (the comparison and the tests share it).
  """
  data = global_batches(config, dataset)
  variables = initial_variables(config)
  params, batch_stats = variables["params"], variables["batch_stats"]
  optimizer = optimizer_of(config)
  opt_state = optimizer.init(params)
  step = make_step(make_loss(config, "jit", None, masked=False), optimizer)
  losses = []
  for i in range(config.steps):
    keep = data["valid"][i]
    x, y = data["x"][i][keep], data["y"][i][keep]
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y,
                                                jnp.ones(len(x), jnp.float32))
    losses.append(float(loss))
  result = {"params": params, "batch_stats": batch_stats}
  return {"variables": jax.tree.map(np.asarray, result), "losses": np.array(losses)}


def train_distributed(config: Config, variant: str, dataset: str, mesh, process_id: int,
                      *, timing_steps: int = 0, norm: str = "jaxnorm") -> dict[str, Any]:
  """Trains on the global batches, this process feeding its own rows; returns host copies.

  With ``timing_steps``, also times that many further steps (after the first, which compiles)
  and returns the median seconds per step.
  """
  data = global_batches(config, dataset)
  rows = process_rows(config, process_id)
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(AXIS))

  def to_global_replicated(value: np.ndarray):
    return jax.make_array_from_callback(value.shape, replicated, lambda index: value[index])

  def to_global_batch(local: np.ndarray):
    return jax.make_array_from_process_local_data(sharded, local)

  variables = jax.tree.map(to_global_replicated, initial_variables(config, norm))
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  optimizer = optimizer_of(config)
  opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
  step = make_step(make_loss(config, variant, mesh, masked=dataset == "masked", norm=norm),
                   optimizer)
  losses, times = [], []
  for i in range(config.steps + timing_steps):
    index = i % config.steps
    x = to_global_batch(data["x"][index][rows])
    y = to_global_batch(data["y"][index][rows])
    weight = to_global_batch(data["valid"][index][rows].astype(np.float32))
    start = time.perf_counter()
    new = step(params, batch_stats, opt_state, x, y, weight)
    jax.block_until_ready(new)
    times.append(time.perf_counter() - start)
    if i < config.steps:
      params, batch_stats, opt_state, loss = new
      losses.append(float(loss.addressable_data(0)))
  local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)),
                       {"params": params, "batch_stats": batch_stats})
  seconds = float(np.median(times[config.steps:])) if timing_steps else float("nan")
  return {"variables": local, "losses": np.array(losses), "seconds_per_step": seconds}


def time_all_gather(config: Config, mesh, repeats: int) -> float:
  """Median seconds of one all_gather of a norm layer's statistics alone: the collective's cost."""
  per_device = np.ones((4, 1, config.hidden), np.float32)  # count, shift, mean, var
  local = np.tile(per_device, (config.devices_per_process, 1, 1))
  stacked = jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local)
  gather = jax.jit(jax.shard_map(lambda s: jax.lax.all_gather(s, AXIS, to="invarying"),
                                 mesh=mesh, in_specs=P(AXIS), out_specs=P()))
  jax.block_until_ready(gather(stacked))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(gather(stacked))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


# ----------------------------------------------------------------------------------------------
# Dataset statistics: each process fits its own part of the data, then they are merged.

STATS_FIELDS = ("count", "mean", "var", "std", "min", "max", "median", "q25", "q75",
                "quantile_error")


def stats_dataset(config: Config) -> tuple[np.ndarray, np.ndarray]:
  """A dataset of 3 channels far from zero, and where each process's part of it ends.

  Process ``p`` holds a share proportional to ``p + 1``: the parts are unequal.
  """
  rng = np.random.default_rng(config.seed + 1)
  rows = 600 * config.num_processes
  data = rng.standard_normal((rows, 3)) * [1.0, 5.0, 0.1] + [1e3, -20.0, 1e5]
  weights = np.arange(1, config.num_processes + 1)
  ends = np.round(rows * np.cumsum(weights) / weights.sum()).astype(int)
  return data.astype(np.float32), ends


def dataset_statistics(config: Config, mesh, process_id: int) -> dict[str, np.ndarray]:
  """This process's view of the statistics of the whole dataset, two ways.

  ``fit_*``: ``jaxnorm.fit_stats`` over this process's part only (in batches of 100 rows), then
  ``jaxnorm.merge_across_processes`` (one process_allgather): exact, quantiles included.
  ``device_*``: ``jaxnorm.device_stats`` under ``jax.shard_map`` on the dataset as one global
  array sharded over every device of every process (one all_gather; float32).
  """

  data, ends = stats_dataset(config)
  start = 0 if process_id == 0 else ends[process_id - 1]
  mine = data[start:ends[process_id]]
  fitted = jaxnorm.fit_stats([mine[i:i + 100] for i in range(0, len(mine), 100)])
  merged = jaxnorm.merge_across_processes(fitted)
  result = {f"fit_{name}": np.asarray(getattr(merged, name)) for name in STATS_FIELDS}
  per_process = len(data) // config.num_processes  # equal shards for the global array
  local = data[process_id * per_process:(process_id + 1) * per_process]
  sharded = jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local)
  device = jax.jit(jax.shard_map(lambda x: jaxnorm.device_stats(x, axis_name=AXIS), mesh=mesh,
                                 in_specs=P(AXIS), out_specs=P()))(sharded)
  for name in ("count", "mean", "var", "min", "max"):
    result[f"device_{name}"] = np.asarray(getattr(device, name).addressable_data(0))
  return result


# ----------------------------------------------------------------------------------------------
# Processes: a worker joins the distributed runtime; the launcher starts and ends the workers.

def configure_host_devices(devices: int) -> None:
  """Gives this process ``devices`` host CPU devices and gloo collectives; call before JAX runs."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator: str, num_processes: int, process_id: int, *,
               timeout: int, heartbeat: int) -> None:
  """Joins the job: the same call on GPU and TPU hosts, with the coordinator host's address.

  ``initialization_timeout`` bounds the wait for every peer to join; a peer that stops sending
  heartbeats for ``heartbeat_timeout_seconds`` (a crash, a lost host) makes every other process
  exit with "The following tasks are unhealthy" instead of hanging in a collective.
  """
  jax.distributed.initialize(
      coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
      initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat,
      shutdown_timeout_seconds=timeout)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """{'params/Dense_0/kernel': array, ...}: a tree as one flat dict of arrays."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[f"{prefix}{key}"] = np.asarray(value)
  return flat


def result_path(out: Path, variant: str, dataset: str, process_id: int) -> Path:
  return out / f"{variant}-{dataset}-process{process_id}.npz"


def run_worker(args: argparse.Namespace) -> int:
  """One process of the job: joins, trains every variant on every dataset, saves the results."""
  configure_host_devices(args.devices_per_process)
  if args.num_processes > 1:
    initialize(args.coordinator, args.num_processes, args.process_id,
               timeout=args.init_timeout, heartbeat=args.heartbeat_timeout)
  if args.fail_after_init and args.process_id == args.num_processes - 1:
    print(f"process {args.process_id}: exiting early on purpose (--fail-after-init)", flush=True)
    os._exit(3)
  config = config_of(args)
  assert jax.process_count() == args.num_processes, jax.process_count()
  axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[args.axis_type]
  mesh = Mesh(np.array(jax.devices()), (AXIS,), axis_types=(axis_type,))
  out = Path(args.out)
  timings = {}
  for variant in args.variants:
    for dataset in args.datasets:
      result = train_distributed(config, variant, dataset, mesh, args.process_id,
                                 timing_steps=args.timing_steps)
      np.savez(result_path(out, variant, dataset, args.process_id),
               losses=result["losses"], **flatten(result["variables"]))
      timings[f"{variant}-{dataset}"] = result["seconds_per_step"]
      print(f"process {args.process_id}: {variant:9s} {dataset:6s} losses "
            f"{np.round(result['losses'], 4).tolist()}", flush=True)
  for norm in args.peer_norms if args.timing_steps else ():
    result = train_distributed(config, "shard_map", "full", mesh, args.process_id,
                               timing_steps=args.timing_steps, norm=norm)
    timings[f"{norm}:shard_map-full"] = result["seconds_per_step"]
  if not args.skip_dataset_stats:
    np.savez(out / f"dataset-stats-process{args.process_id}.npz",
             **dataset_statistics(config, mesh, args.process_id))
    print(f"process {args.process_id}: dataset statistics merged", flush=True)
  if args.timing_steps:
    timings["all_gather"] = time_all_gather(config, mesh, args.timing_steps)
    (out / f"timings-process{args.process_id}.json").write_text(json.dumps(timings))
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return 0


def free_port() -> int:
  """A TCP port that is free on the loopback interface now."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def worker_command(args: argparse.Namespace, process_id: int, coordinator: str) -> list[str]:
  """The command line that starts worker ``process_id`` of the job ``args`` describes."""
  command = [sys.executable, "-u", str(Path(__file__).resolve()), "--process-id", str(process_id),
             "--coordinator", coordinator, "--out", str(args.out)]
  for name in ("axis_type", "num_processes", "devices_per_process", "rows_per_device", "steps",
               "hidden", "seed", "init_timeout", "heartbeat_timeout", "timing_steps"):
    command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
  command += ["--learning-rate", repr(args.learning_rate)]
  command += ["--variants", *args.variants, "--datasets", *args.datasets]
  if args.fail_after_init:
    command.append("--fail-after-init")
  if args.skip_dataset_stats:
    command.append("--skip-dataset-stats")
  if args.peer_norms:
    command += ["--peer-norms", *args.peer_norms]
  return command


def start_workers(args: argparse.Namespace, *, log_dir: Path, started: list[subprocess.Popen],
                  only: Sequence[int] | None = None) -> list[subprocess.Popen]:
  """Starts the workers of the job on a fresh loopback port; their output goes to log files.

  Each handle is appended to ``started`` as soon as its process exists, so that the caller can
  end it even if starting a later one fails. ``only``: start just these process ids (the others
  never join: the failure path).
  """
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # each worker sets its own device count
  env.pop("JAX_NUM_CPU_DEVICES", None)
  for process_id in range(args.num_processes) if only is None else only:
    with open(log_dir / f"worker{process_id}.log", "w") as log:
      started.append(subprocess.Popen(worker_command(args, process_id, coordinator), env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
  return started


def wait_workers(procs: Sequence[subprocess.Popen], timeout: float) -> list[int | None]:
  """Waits for every worker until ``timeout`` seconds in all; None for one still running."""
  deadline = time.monotonic() + timeout
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.01)))
    except subprocess.TimeoutExpired:
      codes.append(None)
  return codes


def stop_workers(procs: Sequence[subprocess.Popen]) -> None:
  """Ends every worker still running, by its own process id (SIGTERM, then SIGKILL)."""
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  for proc in procs:
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait(timeout=5)


def run_job(args: argparse.Namespace,
            started: list[subprocess.Popen] | None = None) -> list[int | None]:
  """Starts the workers, waits for them (bounded), and always ends them.

  ``started``: a list that receives the workers' handles as they start (for a caller that
  ends them itself too).
  """
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  procs = [] if started is None else started
  try:
    start_workers(args, log_dir=out, started=procs)
    codes = wait_workers(procs, args.job_timeout)
  finally:
    stop_workers(procs)
  return codes


def diagnose(log: str, code: int | None) -> str:
  """One line on why a worker ended, from its exit code and log (JAX's runtime aborts it)."""
  if code == 0:
    return "finished"
  if code is None:
    return "still running at the launcher's deadline (--job-timeout): ended by the launcher"
  if "RegisterTask" in log or ("Barrier" in log and "DEADLINE_EXCEEDED" in log):
    return ("could not join: not every process reached the coordinator within "
            "--init-timeout seconds (a peer did not start, or the address is wrong)")
  if "unhealthy" in log or "another task died" in log:
    dead = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)", log)
    peers = dead.group(1).split() if dead else ["?"]
    return (f"stopped because process(es) {', '.join(peers)} died "
            f"(no heartbeat for --heartbeat-timeout seconds)")
  return f"failed with exit code {code}"


def load_result(out: Path, variant: str, dataset: str, process_id: int) -> dict[str, np.ndarray]:
  with np.load(result_path(out, variant, dataset, process_id)) as saved:
    return dict(saved)


def compare(args: argparse.Namespace,
            references: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
  """For every variant and dataset: the largest difference of any process from the reference.

  ``references``: the result of :func:`train_reference` for each dataset, if already computed.
  """
  config = config_of(args)
  rows = []
  for dataset in args.datasets:
    if references and dataset in references:
      reference = references[dataset]
    else:
      reference = train_reference(config, dataset)
    expected = flatten(reference["variables"])
    for variant in args.variants:
      worst = {"params": 0.0, "batch_stats": 0.0, "losses": 0.0}
      finite = True
      for process_id in range(args.num_processes):
        result = load_result(Path(args.out), variant, dataset, process_id)
        finite &= all(np.isfinite(value).all() for value in result.values())
        worst["losses"] = max(worst["losses"],
                              float(np.max(np.abs(result["losses"] - reference["losses"]))))
        for name, value in expected.items():
          group = name.split("/")[0]
          scale = 1 + np.abs(value)
          worst[group] = max(worst[group], float(np.max(np.abs(result[name] - value) / scale)))
      rows.append({"variant": variant, "dataset": dataset, "finite": bool(finite), **worst})
  return rows


def config_of(args: argparse.Namespace) -> Config:
  return Config(args.num_processes, args.devices_per_process, args.rows_per_device, args.steps,
                args.hidden, args.learning_rate, args.seed)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="few steps (a few seconds of work)")
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--rows-per-device", type=int, default=8)
  parser.add_argument("--steps", type=int, default=None, help="default 20, 4 with --quick")
  parser.add_argument("--hidden", type=int, default=16)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
  parser.add_argument("--axis-type", choices=("explicit", "auto"), default="explicit",
                      help="the mesh's axis type: explicit (jax.make_mesh's default) or auto")
  parser.add_argument("--out", default=None, help="folder for results and worker logs")
  parser.add_argument("--init-timeout", type=int, default=30,
                      help="seconds for every process to join (and to shut down)")
  parser.add_argument("--heartbeat-timeout", type=int, default=10,
                      help="seconds without a heartbeat after which a peer counts as dead")
  parser.add_argument("--job-timeout", type=float, default=300,
                      help="the launcher ends every worker still running after this many seconds")
  parser.add_argument("--timing-steps", type=int, default=0,
                      help="time this many more steps per run (benchmarks/scaling.py)")
  parser.add_argument("--skip-dataset-stats", action="store_true",
                      help="skip fitting dataset statistics across the processes")
  parser.add_argument("--peer-norms", nargs="*", choices=("flax", "none"), default=[],
                      help="with --timing-steps, also time shard_map on full batches with "
                           "flax.linen.BatchNorm or no norm")
  parser.add_argument("--process-id", type=int, default=None, help="run as this worker")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0 (workers)")
  parser.add_argument("--fail-after-init", action="store_true",
                      help="the last worker exits right after joining (tests the failure path)")
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 4 if args.quick else 20
  return args


def main(argv: Sequence[str] | None = None, *,
         started: list[subprocess.Popen] | None = None) -> int:
  """Runs the job (or, with ``--process-id``, one worker of it); 0 if it matched the reference.

  ``started`` receives the handles of the workers as they start.
  """
  args = parse_args(argv)
  if args.process_id is not None:
    return run_worker(args)
  if args.out is None:
    import tempfile
    args.out = tempfile.mkdtemp(prefix="jaxnorm-multiprocess-")
  print(f"{args.num_processes} processes x {args.devices_per_process} host devices, "
        f"{args.rows_per_device} rows per device, {args.steps} steps; results in {args.out}")
  codes = run_job(args, started)
  if any(code != 0 for code in codes):
    for process_id in range(args.num_processes):
      log = (Path(args.out) / f"worker{process_id}.log").read_text()
      print(f"--- worker {process_id} (exit code {codes[process_id]}):\n{log[-3000:]}")
    for process_id, code in enumerate(codes):
      log = (Path(args.out) / f"worker{process_id}.log").read_text()
      print(f"worker {process_id}: {diagnose(log, code)}")
    return 1
  print("\ndistributed training vs one process on the concatenated valid rows "
        "(largest relative difference)")
  print(f"{'variant':10s} {'data':7s} {'params':>9s} {'batch_stats':>12s} {'loss':>9s}  finite")
  ok = True
  for row in compare(args):
    print(f"{row['variant']:10s} {row['dataset']:7s} {row['params']:9.1e} "
          f"{row['batch_stats']:12.1e} {row['losses']:9.1e}  {row['finite']}")
    ok &= row["finite"] and max(row["params"], row["batch_stats"], row["losses"]) < 1e-4
  print("equal to single-process training (float32 rounding)" if ok else "MISMATCH")
  if not args.skip_dataset_stats:
    ok &= print_dataset_statistics(args)
  return 0 if ok else 1


def print_dataset_statistics(args: argparse.Namespace) -> bool:
  """Prints how far the merged dataset statistics are from one fit over all the data."""
  data, ends = stats_dataset(config_of(args))
  together = jaxnorm.fit_stats([data[i:i + 100] for i in range(0, len(data), 100)])
  print(f"\ndataset statistics: processes fitted {np.diff(ends, prepend=0).tolist()} rows, "
        f"merged; largest relative difference from fit_stats of all {len(data)} rows")
  ok = True
  for process_id in range(args.num_processes):
    with np.load(Path(args.out) / f"dataset-stats-process{process_id}.npz") as merged:
      gaps = {name: float(np.max(np.abs(merged[f"fit_{name}"] - getattr(together, name))
                                 / np.maximum(np.abs(getattr(together, name)), 1e-30)))
              for name in ("count", "mean", "var", "min", "max", "median")}
    print(f"process {process_id}: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    ok &= max(gaps.values()) < 1e-6
  return ok


if __name__ == "__main__":
  sys.exit(main())
