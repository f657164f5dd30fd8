"""Synchronized statistics across real processes, with ``jax.distributed`` over loopback.

Two local processes with two host CPU devices each (gloo collectives) train the Flax model of
``examples/multiprocess_train.py`` with ``jaxnorm.linen.BatchNorm``, under ``jax.shard_map`` with
``axis_name`` and under sharded ``jit`` without, on full batches and on masked batches where the
processes hold unequal numbers of valid rows and one process holds none at some steps. Their
parameters, running statistics and losses must equal those of one process on one device trained,
in this test process, on the valid rows of every global batch concatenated; the running
statistics of the input layer must equal a float64 NumPy reference. Dataset statistics fitted by
each process on its own unequal part of the data and merged (``jaxnorm.merge_across_processes``)
must equal ``jaxnorm.fit_stats`` over all of it, and ``jaxnorm.device_stats`` over a global array
a float64 reference. The failure paths are tested too: a peer that dies after joining, and a peer
that never joins, make the other process exit by itself with a message that says so. Every
process a test starts is ended in a ``finally``, by its process id. The launcher, the workers and
the comparison live in ``tests/multiprocess_harness.py``; the example itself also runs as a user
runs it (``--quick``).

In this process (8 host devices from conftest.py): the collectives in a compiled training step,
one per normalization layer; batch norm under sharded ``jit`` over an Explicit mesh.

The module's fixtures, a two-process job among them, must run once in all, not once per xdist
worker: ``make test`` runs ``pytest -n 2 --dist loadfile``, which keeps a file's tests on one
worker. The tests are also in one ``xdist_group`` for ``--dist loadgroup``, which pytest-xdist
3.8 ignores under pytest 9.2 (pytest-dev/pytest-xdist#1386).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tests import multiprocess_harness as harness
from tests import reference

pytestmark = pytest.mark.xdist_group("multiprocess")

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Bounds that hold on a busy 2-core machine: a healthy job takes 30 s to 2 minutes there.
JOB_TIMEOUT = 480  # seconds for the whole two-process job
FAILURE_TIMEOUT = 180  # seconds for a process whose peer died or never joined to stop by itself
TIMING_STEPS = 2  # the job also times its steps, as benchmarks/scaling.py has it do


def worker_logs(out: pathlib.Path, count: int) -> str:
  return "\n".join(f"--- worker {i}:\n" + (out / f"worker{i}.log").read_text()[-4000:]
                   for i in range(count) if (out / f"worker{i}.log").exists())


def run_workers(args, *, timeout: float, start: range | None = None) -> tuple[list, str]:
  """Starts the workers of ``args`` (or only those in ``start``), waits, always ends them all.

  Returns each worker's exit code (None: still running at the deadline, then killed) and their
  logs.
  """
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  procs: list[subprocess.Popen] = []
  try:
    harness.start_workers(args, log_dir=out, started=procs, only=start)
    codes = harness.wait_workers(procs, timeout)
  finally:
    harness.stop_workers(procs)
    assert all(proc.poll() is not None for proc in procs), [proc.pid for proc in procs]
  return codes, worker_logs(out, args.num_processes)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """A quick job: 2 processes x 2 devices, 3 steps, both variants and datasets, timed steps too.

  3 steps are the fewest where each process holds no valid row at some step of the masked data
  (steps 0 and 2); each distinct number of valid rows costs the reference one more compile.

  The harness starts the workers, compares them with one process itself (exit code 0 when they
  match) and ends them; this test ends any left, by their process ids.
  """
  argv = ["--quick", "--steps", "3", "--out", str(tmp_path_factory.mktemp("job")),
          "--job-timeout", str(JOB_TIMEOUT), "--timing-steps", str(TIMING_STEPS),
          "--peer-norms", "flax", "none"]
  args = harness.parse_args(argv)
  procs: list[subprocess.Popen] = []
  try:
    code = harness.main(argv, started=procs)
  finally:
    harness.stop_workers(procs)
  assert len(procs) == args.num_processes
  assert all(proc.poll() is not None for proc in procs), [proc.pid for proc in procs]
  assert code == 0, worker_logs(pathlib.Path(args.out), args.num_processes)
  return args


@pytest.fixture(scope="module")
def references(job):
  """One process on one device, on the valid rows of every global batch, for each dataset."""
  config = harness.config_of(job)
  return {dataset: harness.train_reference(config, dataset) for dataset in harness.DATASETS}


def test_job_runs_two_processes_with_two_devices_each(job):
  logs = worker_logs(pathlib.Path(job.out), job.num_processes)
  assert job.num_processes == 2 and job.devices_per_process == 2
  for process_id in range(2):
    for variant in harness.VARIANTS:
      for dataset in harness.DATASETS:
        assert harness.result_path(pathlib.Path(job.out), variant, dataset, process_id).exists()
    assert f"process {process_id}: shard_map full" in logs, logs


@pytest.mark.parametrize("dataset", harness.DATASETS)
def test_distributed_training_equals_one_process_on_the_whole_batch(job, references, dataset):
  expected = references[dataset]
  flat_expected = harness.flatten(expected["variables"])
  for variant in harness.VARIANTS:
    for process_id in range(job.num_processes):
      result = harness.load_result(pathlib.Path(job.out), variant, dataset, process_id)
      assert set(result) == set(flat_expected) | {"losses"}
      for name, value in result.items():
        assert np.isfinite(value).all(), (variant, process_id, name)
      np.testing.assert_allclose(result["losses"], expected["losses"], rtol=2e-5, atol=2e-5,
                                 err_msg=f"{variant} process {process_id}")
      for name, value in flat_expected.items():
        np.testing.assert_allclose(result[name], value, rtol=2e-5, atol=2e-5,
                                   err_msg=f"{variant} process {process_id} {name}")


@pytest.mark.parametrize("dataset", harness.DATASETS)
def test_input_layer_running_statistics_equal_float64_reference(job, dataset):
  """The first BatchNorm sees the data itself: its running stats follow from the valid rows."""
  config = harness.config_of(job)
  data = harness.global_batches(config, dataset)
  mean, var = np.zeros(harness.FEATURES), np.ones(harness.FEATURES)
  for step in range(config.steps):
    valid = data["valid"][step]
    if dataset == "masked":
      assert not valid.all()
    batch_mean, batch_var, count = reference.moments(data["x"][step], 0, valid[:, None])
    unbiased = batch_var[0] * count[0] / (count[0] - 1)
    mean, var = 0.9 * mean + 0.1 * batch_mean[0], 0.9 * var + 0.1 * unbiased
  for variant in harness.VARIANTS:
    for process_id in range(job.num_processes):
      result = harness.load_result(pathlib.Path(job.out), variant, dataset, process_id)
      np.testing.assert_allclose(result["batch_stats/BatchNorm_0/mean"], mean, rtol=1e-5)
      np.testing.assert_allclose(result["batch_stats/BatchNorm_0/var"], var, rtol=1e-5)


def test_masked_data_has_fully_masked_processes_and_unequal_counts(job):
  config = harness.config_of(job)
  valid = harness.global_batches(config, "masked")["valid"]
  per_process = valid.reshape(config.steps, config.num_processes, -1).sum(-1)
  num_devices = config.num_processes * config.devices_per_process
  per_device = valid.reshape(config.steps, num_devices, -1).sum(-1)
  assert (per_process == 0).any(axis=0).all(), per_process  # each process empty at some step
  assert len(np.unique(per_device)) > 3, per_device


def test_harness_compares_the_job_with_the_reference(job, references):
  rows = harness.compare(job, references)
  assert len(rows) == len(harness.VARIANTS) * len(harness.DATASETS)
  for row in rows:
    assert row["finite"] and max(row["params"], row["batch_stats"], row["losses"]) < 1e-4, row


def test_fit_stats_merged_across_processes_equal_fit_stats_of_all_the_data(job):
  """Each process fits its own (unequal) part; the merge equals one fit over everything."""
  import jaxnorm
  config = harness.config_of(job)
  data, ends = harness.stats_dataset(config)
  assert len(set(np.diff(np.concatenate([[0], ends])))) == job.num_processes  # unequal parts
  together = jaxnorm.fit_stats([data[i:i + 100] for i in range(0, len(data), 100)])
  exact = data.astype(np.float64)
  results = [dict(np.load(pathlib.Path(job.out) / f"dataset-stats-process{p}.npz"))
             for p in range(job.num_processes)]
  for name in results[0]:
    np.testing.assert_array_equal(results[0][name], results[1][name], err_msg=name)
  merged = results[0]
  np.testing.assert_array_equal(merged["fit_count"], together.count)
  np.testing.assert_array_equal(merged["fit_count"], [len(data)] * 3)
  np.testing.assert_allclose(merged["fit_mean"], exact.mean(0), rtol=1e-12)
  np.testing.assert_allclose(merged["fit_var"], exact.var(0), rtol=1e-10)
  np.testing.assert_allclose(merged["fit_std"], together.std, rtol=1e-10)
  np.testing.assert_array_equal(merged["fit_min"], exact.min(0))
  np.testing.assert_array_equal(merged["fit_max"], exact.max(0))
  for name, q in (("fit_q25", 0.25), ("fit_median", 0.5), ("fit_q75", 0.75)):
    bound = merged["fit_quantile_error"] + 1e-9 * np.abs(merged[name])
    assert (np.abs(merged[name] - np.quantile(exact, q, axis=0)) <= bound).all(), name
    assert (np.abs(merged[name] - getattr(together, name[4:]))
            <= bound + together.quantile_error).all(), name


def test_device_stats_over_every_process_equal_float64_reference(job):
  config = harness.config_of(job)
  exact = harness.stats_dataset(config)[0].astype(np.float64)
  merged = dict(np.load(pathlib.Path(job.out) / "dataset-stats-process0.npz"))
  np.testing.assert_array_equal(merged["device_count"], [len(exact)] * 3)
  np.testing.assert_allclose(merged["device_mean"], exact.mean(0), rtol=1e-7)
  np.testing.assert_allclose(merged["device_var"], exact.var(0), rtol=1e-4)
  np.testing.assert_array_equal(merged["device_min"], exact.min(0))
  np.testing.assert_array_equal(merged["device_max"], exact.max(0))


def test_recomputed_batch_stats_over_every_process_equal_float64_reference(job):
  """jaxnorm.linen.recompute_batch_stats on batches sharded over both processes' devices."""
  config = harness.config_of(job)
  for process_id in range(job.num_processes):
    merged = dict(np.load(pathlib.Path(job.out) / f"dataset-stats-process{process_id}.npz"))
    rows = int(merged["population_rows"])
    exact = harness.stats_dataset(config)[0].astype(np.float32)[:rows].astype(np.float64)
    np.testing.assert_allclose(merged["population_mean"], exact.mean(0), rtol=1e-6)
    np.testing.assert_allclose(merged["population_var"], exact.var(0, ddof=1), rtol=1e-4)


def test_job_times_what_the_scaling_benchmark_reads(job):
  """benchmarks/scaling.py reads these timings: every variant, the peer norms, the all_gather."""
  for process_id in range(job.num_processes):
    timings = json.loads((pathlib.Path(job.out) / f"timings-process{process_id}.json").read_text())
    assert list(timings) == harness.timing_keys(), timings
    assert all(math.isfinite(seconds) and seconds > 0 for seconds in timings.values()), timings


def test_scaling_benchmark_counts_one_all_gather_per_norm_layer():
  """The collective table of benchmarks/scaling.py, from the harness's compiled steps."""
  spec = importlib.util.spec_from_file_location("benchmarks_scaling",
                                                ROOT / "benchmarks" / "scaling.py")
  scaling = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(scaling)
  rows = scaling.collective_counts(harness)
  assert len(rows) == 3 * len(harness.DATASETS), rows
  for label, dataset, layers, everything in rows:
    if label.startswith("jit (auto"):
      assert set(everything) == {"all-reduce"}, (label, dataset, everything)
    else:
      assert layers == {"BatchNorm_0 all-gather": 1, "BatchNorm_1 all-gather": 1}, (label, layers)


def test_example_runs_two_processes_in_quick_mode():
  """examples/multiprocess_train.py as a user runs it: 2 local processes, shard_map equals jit.

  The example's launcher and its two workers run in a session of their own, ended as a group
  (by the launcher's process id) if they outlive the bound.
  """
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "multiprocess_train.py"),
                           "--quick"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, cwd=ROOT, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=JOB_TIMEOUT)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == 0, out[-4000:]
  for process_id in range(2):
    for data in harness.DATASETS:
      line = re.search(rf"process {process_id}, {data} batches: losses \[(.*)\]; "
                       rf"shard_map and jit differ by ([\d.e+-]+)", out)
      assert line, out[-4000:]
      assert len(line.group(1).split(",")) == 4 and float(line.group(2)) < 1e-4, line.group(0)


def test_peer_that_dies_after_joining_makes_the_other_fail_fast(tmp_path):
  """Process 1 exits right after joining; process 0 stops by itself on the missed heartbeats.

  Joining may take a minute on a busy machine (--init-timeout 120); once process 1 is gone,
  process 0 must stop by itself within FAILURE_TIMEOUT, not hang in a collective.
  """
  args = harness.parse_args(["--quick", "--out", str(tmp_path), "--heartbeat-timeout", "5",
                             "--init-timeout", "120", "--fail-after-init"])
  codes, logs = run_workers(args, timeout=FAILURE_TIMEOUT)
  assert codes[1] == 3, logs  # the one that exits on purpose
  assert codes[0] is not None and codes[0] != 0, logs  # ended by itself, before the deadline
  log = (tmp_path / "worker0.log").read_text()
  assert harness.diagnose(log, codes[0]).startswith("stopped because process(es) 1 died"), logs


def test_peer_that_never_joins_makes_initialization_fail_fast(tmp_path):
  """Process 1 is never started: process 0 gives up joining after --init-timeout by itself."""
  args = harness.parse_args(["--quick", "--out", str(tmp_path), "--init-timeout", "3"])
  codes, logs = run_workers(args, timeout=FAILURE_TIMEOUT, start=range(1))
  assert codes[0] is not None and codes[0] != 0, logs
  log = (tmp_path / "worker0.log").read_text()
  assert harness.diagnose(log, codes[0]).startswith("could not join"), logs


# ----------------------------------------------------------------------------------------------
# Collectives in the compiled training step, in this process on 8 host devices.

def compiled_step(variant: str, dataset: str, axis_type):
  """The example's whole training step (forward, backward, update) compiled on 8 devices."""
  return harness.compiled_step_text(harness.Config(1, 8, 4, 1, 16, 0.05, 0), variant, dataset,
                                    axis_type)


collectives = harness.collectives
per_layer = harness.per_layer


@pytest.mark.parametrize("dataset", harness.DATASETS)
@pytest.mark.parametrize("variant, axis_type", [("shard_map", AxisType.Auto),
                                                ("shard_map", AxisType.Explicit),
                                                ("jit", AxisType.Explicit)])
def test_training_step_has_one_all_gather_per_norm_layer(variant, axis_type, dataset):
  found = collectives(compiled_step(variant, dataset, axis_type))
  assert per_layer(found) == {"BatchNorm_0": 1, "BatchNorm_1": 1}, found
  assert [kind for kind, name in found if "/BatchNorm_" in name and "transpose(" not in name] \
      == ["all-gather"] * 2, found
  # Everything else reduces the loss and the gradients, as any data-parallel step does; XLA
  # combines those all-reduces.
  others = [kind for kind, name in found if "/BatchNorm_" not in name or "transpose(" in name]
  assert set(others) <= {"all-reduce"} and len(others) <= 3, found


@pytest.mark.parametrize("dataset", harness.DATASETS)
def test_auto_mesh_jit_step_lets_xla_reduce_each_norm_layer(dataset):
  """Under an Auto mesh the sharding is not visible while tracing: XLA partitions the sums."""
  found = collectives(compiled_step("jit", dataset, AxisType.Auto))
  counts = per_layer(found)
  assert all(count >= 1 for count in counts.values()), found
  assert all(kind == "all-reduce" for kind, _ in found), found


# ----------------------------------------------------------------------------------------------
# Sharded jit over an Explicit mesh (jax.make_mesh's default), in this process on 8 devices.

VALID_ROWS = [4, 1, 0, 2, 3, 0, 4, 1]  # per device along "batch": unequal, two fully masked


def explicit_batch(rows_per_device=4, channels=6, offset=1e3, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((8 * rows_per_device, channels)) * 2 + offset).astype(np.float32)
  where = np.zeros((8 * rows_per_device, 1), bool)
  for device, valid in enumerate(VALID_ROWS):
    where[device * rows_per_device:device * rows_per_device + valid] = True
  x[~where[:, 0]] = 1e4 * rng.standard_normal((int((~where).sum()), channels))
  return x, where


@pytest.mark.parametrize("mesh_shape, x_spec, masked, jitted", [
    ((8,), P("b"), False, True),
    ((8,), P("b"), True, True),
    ((8,), P("b"), True, False),
    ((4, 2), P("b", "f"), True, True),  # features sharded too: pooled over "b" only
    ((2, 4), P(("b", "f")), True, True),  # rows sharded over both mesh axes
])
def test_batch_norm_on_explicit_mesh_equals_float64_reference(mesh_shape, x_spec, masked, jitted):
  import jaxnorm
  mesh = jax.make_mesh(mesh_shape, ("b", "f")[:len(mesh_shape)],
                       axis_types=(AxisType.Explicit,) * len(mesh_shape))
  x, where = explicit_batch()
  where = where if masked else None
  x_sharded = jax.device_put(x, NamedSharding(mesh, x_spec))
  mask_spec = P(x_spec[0], None)
  where_sharded = None if where is None else jax.device_put(where, NamedSharding(mesh, mask_spec))

  def run(x, where):
    return jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(6), training=True, momentum=0.5,
                              epsilon=0.0, where=where)
  y, running = (jax.jit(run) if jitted else run)(x_sharded, where_sharded)
  mean, var, count = reference.moments(x, 0, where)
  expected_y = (x - mean) / np.sqrt(var)
  valid = reference.mask_of(where, x.shape)
  assert np.isfinite(np.asarray(y)).all()
  assert reference.max_error(y, expected_y, valid) < 1e-4
  np.testing.assert_allclose(running.mean, 0.5 * mean[0], rtol=1e-6)
  np.testing.assert_allclose(running.var, 0.5 + 0.5 * var[0] * count[0] / (count[0] - 1),
                             rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_mesh_input_gradient_equals_one_device(masked):
  import jaxnorm
  mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Explicit,))
  x, where = explicit_batch(offset=10.0)
  where = where if masked else None
  weights = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)

  def loss(x, where):
    y, _ = jaxnorm.batch_norm(x, None, training=True, where=where)
    return jnp.sum(jnp.where(True if where is None else where, y * weights, 0))
  expected = jax.jit(jax.grad(loss))(x, where)  # on one device: x and where are NumPy arrays
  sharded = NamedSharding(mesh, P("b"))
  actual = jax.jit(jax.grad(loss))(jax.device_put(x, sharded),
                                   None if where is None else jax.device_put(where, sharded))
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_explicit_mesh_batch_norm_compiles_to_one_all_gather():
  import jaxnorm
  mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Explicit,))
  x, where = explicit_batch()
  sharded = NamedSharding(mesh, P("b"))
  for mask in (None, jax.device_put(where, sharded)):
    run = jax.jit(lambda x, w: jaxnorm.batch_norm(x, jaxnorm.init_batch_stats(6), training=True,
                                                  where=w))
    found = collectives(run.lower(jax.device_put(x, sharded), mask).compile().as_text())
    assert [kind for kind, _ in found] == ["all-gather"], found


def test_layer_norm_over_features_sharded_on_explicit_mesh_uses_one_all_gather():
  """Tensor-parallel features: layer norm pools each row's statistics over the feature shards."""
  import jaxnorm
  mesh = jax.make_mesh((2, 4), ("b", "f"), axis_types=(AxisType.Explicit,) * 2)
  x = (np.random.default_rng(3).standard_normal((8, 16)) * 3 + 1e3).astype(np.float32)
  run = jax.jit(lambda x: jaxnorm.layer_norm(x, epsilon=0.0))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("b", "f")))
  assert reference.max_error(run(x_sharded), reference.standardize(x, -1)) < 1e-4
  found = collectives(run.lower(x_sharded).compile().as_text())
  assert [kind for kind, _ in found] == ["all-gather"], found
