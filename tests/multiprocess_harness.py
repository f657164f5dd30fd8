"""Jobs of several local processes for tests/test_multiprocess.py and benchmarks/scaling.py.

The machinery around ``examples/multiprocess_train.py`` that a user does not copy:

- the launcher: a free loopback port, workers with log files, bounded waits, every worker ended
  by its own process id; ``diagnose`` says in one line why a worker ended;
- the worker (this file run with ``--process-id``): trains with the example's ``train`` for every
  variant and dataset and saves the results as .npz; fits dataset statistics on its own part of
  the data and merges them across processes; with ``--timing-steps``, times the example's step;
  with ``--fail-after-init``, exits right after joining (the failure path);
- the single-process reference (one device, on the valid rows of every global batch
  concatenated) and the comparison of every worker's results with it;
- the collectives of the example's training step compiled on 8 host devices.

``python tests/multiprocess_harness.py [--quick]`` runs a job and prints the comparison.
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
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm

ROOT = Path(__file__).resolve().parent.parent


def _import_example():
  """examples/multiprocess_train.py, imported as the module ``multiprocess_train``."""
  if "multiprocess_train" not in sys.modules:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
      import multiprocess_train  # noqa: F401
    finally:
      sys.path.remove(str(ROOT / "examples"))
  return sys.modules["multiprocess_train"]


example = _import_example()

AXIS = example.AXIS
FEATURES = example.FEATURES
Config = example.Config
VARIANTS = ("shard_map", "jit")
DATASETS = ("full", "masked")
PEER_NORMS = {"flax": nn.BatchNorm}  # and "none": no norm layer at all
STATS_FIELDS = ("count", "mean", "var", "std", "min", "max", "median", "q25", "q75",
                "quantile_error")


class NoNorm(nn.Module):
  """Takes BatchNorm's arguments and returns its input: the step without normalization."""
  use_running_average: bool | None = None
  momentum: float = 0.9
  axis_name: str | None = None

  def __call__(self, x, mask=None):
    return x


def timing_keys(peer_norms: Sequence[str] = ("flax", "none")) -> list[str]:
  """The keys of a worker's timings file, in the order benchmarks/scaling.py prints them."""
  return ([f"{v}-{d}" for v in VARIANTS for d in DATASETS]
          + [f"{norm}:shard_map-full" for norm in peer_norms] + ["all_gather"])


# ----------------------------------------------------------------------------------------------
# Data and the single-process reference.

def global_batches(config: Config, dataset: str) -> dict[str, np.ndarray]:
  """The example's global batches of ``dataset`` ("full" or "masked"), with ``valid`` rows."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset={dataset!r} is not one of {DATASETS}")
  data = example.global_batches(config, dataset == "masked")
  return {**data, "valid": data["weight"] > 0}


def process_rows(config: Config, process_id: int) -> slice:
  """The rows of a global batch that ``process_id`` holds."""
  per_process = config.devices_per_process * config.rows_per_device
  return slice(process_id * per_process, (process_id + 1) * per_process)


@functools.cache
def _reference(config: Config, dataset: str) -> dict[str, Any]:
  data = global_batches(config, dataset)
  step, (params, batch_stats, opt_state) = example.make_step(config, None, "jit", masked=False)
  losses = []
  for x, y, valid in zip(data["x"], data["y"], data["valid"]):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x[valid],
                                                y[valid], np.ones(valid.sum(), np.float32))
    losses.append(float(loss))
  variables = jax.tree.map(np.asarray, {"params": params, "batch_stats": batch_stats})
  return {"variables": variables, "losses": np.array(losses)}


def train_reference(config: Config, dataset: str) -> dict[str, Any]:
  """Trains on one device, on the valid rows of each global batch concatenated, without masks.

  Deterministic, so computed once per configuration in a process.
  """
  return _reference(config, dataset)


# ----------------------------------------------------------------------------------------------
# Collectives in the compiled training step.

COLLECTIVE = re.compile(r"= \S+ (all-gather|all-reduce|reduce-scatter|collective-permute|"
                        r"all-to-all|collective-broadcast)(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, str]]:
  """(kind, op_name) of every collective in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    match = COLLECTIVE.search(line)
    if match:
      name = re.search(r'op_name="([^"]*)"', line)
      found.append((match.group(1), name.group(1) if name else ""))
  return found


def forward_layer(op_name: str) -> str | None:
  """The BatchNorm layer whose forward pass an op belongs to; None elsewhere and in gradients."""
  layer = re.search(r"/(BatchNorm_\d+)/", op_name)
  return layer.group(1) if layer and "transpose(" not in op_name else None


def per_layer(found: list[tuple[str, str]]) -> dict[str, int]:
  """Collectives of each BatchNorm layer's forward pass (not its gradient)."""
  counts = {"BatchNorm_0": 0, "BatchNorm_1": 0}
  for _, name in found:
    layer = forward_layer(name)
    if layer:
      counts[layer] = counts.get(layer, 0) + 1
  return counts


@functools.cache
def compiled_step_text(config: Config, variant: str, dataset: str, axis_type) -> str:
  """The example's whole training step (forward, backward, update) on 8 host devices, as text."""
  mesh = Mesh(np.array(jax.devices()[:8]), (AXIS,), axis_types=(axis_type,))
  data = global_batches(config, dataset)
  step, state = example.make_step(config, mesh, variant, masked=dataset == "masked")
  batch = NamedSharding(mesh, P(AXIS))
  x, y, weight = (jax.device_put(data[key][0], batch) for key in ("x", "y", "weight"))
  params, batch_stats, opt_state = jax.device_put(state, NamedSharding(mesh, P()))
  return step.lower(params, batch_stats, opt_state, x, y, weight).compile().as_text()


# ----------------------------------------------------------------------------------------------
# The worker: one process of a job.

def time_steps(config: Config, mesh, variant: str, dataset: str, repeats: int,
               norm=None) -> float:
  """Median seconds of the example's training step, after a warm-up call.

  The warm-up compiles the step, unless training already did (:func:`share_compiled_steps`).
  """
  data = global_batches(config._replace(steps=1), dataset)
  rows = process_rows(config, jax.process_index())
  step, state = example.make_step(config, mesh, variant, dataset == "masked",
                                  **({} if norm is None else {"norm": norm}))
  state = jax.device_put(state, NamedSharding(mesh, P()))
  batch = [jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), data[key][0][rows])
           for key in ("x", "y", "weight")]
  jax.block_until_ready(step(*state, *batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*state, *batch))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


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

  ``fit_*``: ``jaxnorm.accumulate_stats`` over this process's part only (in batches of 100 rows),
  then ``jaxnorm.merge_across_processes`` (two process_allgathers): exact, quantiles included.
  ``device_*``: ``jaxnorm.device_stats`` under ``jax.shard_map`` on the dataset as one global
  array sharded over every device of every process (one all_gather; float32).
  """
  data, ends = stats_dataset(config)
  start = 0 if process_id == 0 else ends[process_id - 1]
  mine = data[start:ends[process_id]]
  fitted = jaxnorm.accumulate_stats([mine[i:i + 100] for i in range(0, len(mine), 100)])
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


def population_statistics(config: Config, mesh) -> dict[str, np.ndarray]:
  """``jaxnorm.linen.recompute_batch_stats`` of a batch-norm model, on batches that are global
  arrays sharded over every device of every process (sharded ``jit``, no ``axis_name``)."""
  import jaxnorm.linen as jnn
  data = stats_dataset(config)[0].astype(np.float32)
  model = jnn.BatchNorm(use_running_average=True)
  variables = model.init(jax.random.key(0), data[:2])
  rows = 40 * config.num_processes  # each batch: 40 rows per process, 20 per device
  per_process = rows // config.num_processes
  sharding = NamedSharding(mesh, P(AXIS))
  batches = [jax.make_array_from_process_local_data(
      sharding, data[start:start + rows][jax.process_index() * per_process:
                                         (jax.process_index() + 1) * per_process])
             for start in range(0, len(data) - rows + 1, rows)]
  recomputed = jnn.recompute_batch_stats(model, variables, batches)
  stats = recomputed["batch_stats"]
  return {"population_rows": np.array(len(batches) * rows),
          **{f"population_{name}": np.asarray(jax.device_get(stats[name]))
             for name in ("mean", "var")}}


def configure_host_devices(devices: int) -> None:
  """Gives this process ``devices`` host CPU devices and gloo collectives; call before JAX runs."""
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


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


def share_compiled_steps() -> None:
  """Makes the example build each training step once in this process (a worker).

  ``example.train`` and :func:`time_steps` both call ``example.make_step``: cached, the timing
  reuses the jitted step that training compiled (same model, mesh and input shardings), instead
  of compiling every variant twice. The step and its start state are not changed by training.
  """
  if not hasattr(example.make_step, "cache_info"):
    example.make_step = functools.cache(example.make_step)


def run_worker(args: argparse.Namespace) -> int:
  """One process of the job: joins, trains every variant on every dataset, saves the results."""
  configure_host_devices(args.devices_per_process)
  share_compiled_steps()
  if args.num_processes > 1:
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout=args.init_timeout,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
        shutdown_timeout_seconds=args.init_timeout)
  if args.fail_after_init and args.process_id == args.num_processes - 1:
    print(f"process {args.process_id}: exiting early on purpose (--fail-after-init)", flush=True)
    os._exit(3)
  config = config_of(args)
  assert jax.process_count() == args.num_processes, jax.process_count()
  axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[args.axis_type]
  mesh = Mesh(np.array(jax.devices()), (AXIS,), axis_types=(axis_type,))
  out = Path(args.out)
  for variant in args.variants:
    for dataset in args.datasets:
      variables, losses = example.train(config, mesh, variant, dataset == "masked")
      np.savez(result_path(out, variant, dataset, args.process_id), losses=losses,
               **flatten(variables))
      print(f"process {args.process_id}: {variant:9s} {dataset:6s} losses "
            f"{np.round(losses, 4).tolist()}", flush=True)
  if not args.skip_dataset_stats:
    np.savez(out / f"dataset-stats-process{args.process_id}.npz",
             **dataset_statistics(config, mesh, args.process_id),
             **population_statistics(config, mesh))
    print(f"process {args.process_id}: dataset statistics merged", flush=True)
  if args.timing_steps:
    timings = {f"{variant}-{dataset}": time_steps(config, mesh, variant, dataset,
                                                  args.timing_steps)
               for variant in args.variants for dataset in args.datasets}
    for norm in args.peer_norms:
      timings[f"{norm}:shard_map-full"] = time_steps(
          config, mesh, "shard_map", "full", args.timing_steps, PEER_NORMS.get(norm, NoNorm))
    timings["all_gather"] = time_all_gather(config, mesh, args.timing_steps)
    (out / f"timings-process{args.process_id}.json").write_text(json.dumps(timings))
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return 0


# ----------------------------------------------------------------------------------------------
# The launcher.

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


# ----------------------------------------------------------------------------------------------
# The comparison with one process.

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


def dataset_statistics_gaps(args: argparse.Namespace) -> list[dict[str, float]]:
  """For each process: how far its merged statistics are from one fit over all the data."""
  data, _ = stats_dataset(config_of(args))
  together = jaxnorm.fit_stats([data[i:i + 100] for i in range(0, len(data), 100)])
  gaps = []
  for process_id in range(args.num_processes):
    with np.load(Path(args.out) / f"dataset-stats-process{process_id}.npz") as merged:
      gaps.append({name: float(np.max(np.abs(merged[f"fit_{name}"] - getattr(together, name))
                                      / np.maximum(np.abs(getattr(together, name)), 1e-30)))
                   for name in ("count", "mean", "var", "min", "max", "median")})
  return gaps


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
  parser.add_argument("--init-timeout", type=int, default=120,
                      help="seconds for every process to join (and to shut down)")
  parser.add_argument("--heartbeat-timeout", type=int, default=30,
                      help="seconds without a heartbeat after which a peer counts as dead")
  parser.add_argument("--job-timeout", type=float, default=600,
                      help="the launcher ends every worker still running after this many seconds")
  parser.add_argument("--timing-steps", type=int, default=0,
                      help="time this many steps of each variant (benchmarks/scaling.py)")
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
  if args.out is not None:
    args.out = str(Path(args.out).resolve())
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
    args.out = tempfile.mkdtemp(prefix="jaxnorm-multiprocess-")
  print(f"{args.num_processes} processes x {args.devices_per_process} host devices, "
        f"{args.rows_per_device} rows per device, {args.steps} steps; results in {args.out}")
  codes = run_job(args, started)
  if any(code != 0 for code in codes):
    for process_id, code in enumerate(codes):
      log = (Path(args.out) / f"worker{process_id}.log").read_text()
      print(f"--- worker {process_id} (exit code {code}):\n{log[-3000:]}")
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
    print("\ndataset statistics merged across processes vs one fit of all the data "
          "(largest relative difference)")
    for process_id, gaps in enumerate(dataset_statistics_gaps(args)):
      print(f"process {process_id}: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
      ok &= max(gaps.values()) < 1e-6
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
