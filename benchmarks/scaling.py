"""Time per training step of synchronized BatchNorm from 1 to 8 host devices and 1 to 2 processes.

Times the training step of ``examples/multiprocess_train.py`` (BatchNorm on the inputs, a hidden
layer with BatchNorm, a linear output) on a fixed global batch spread over ``processes x
devices`` host CPU devices, under ``jax.shard_map`` with ``axis_name`` and under sharded ``jit``
over an Explicit mesh, on full and on masked batches; beside it, the same ``shard_map`` step
with ``flax.linen.BatchNorm(axis_name=...)`` (one pmean of per-device means a layer) and with no
norm at all, and one all_gather of a layer's statistics alone. Two processes talk through
``jax.distributed`` over loopback with gloo collectives. Each configuration runs in fresh worker
processes, started by the launcher in ``tests/multiprocess_harness.py``; the figure is the
median over the timed steps (after the step that compiles) of the slowest process, and the
configurations take turns over ``--rounds`` rounds (median of rounds).

Beside the times: the collectives of the compiled training step on 8 host devices, per
normalization layer and in all (deterministic, unlike the times).

Host devices share the machine's cores: on a 2-core machine, 4 or 8 devices only add
scheduling and collective overhead, and absolute times on a shared machine are noisy.

Run: python benchmarks/scaling.py [--quick] [--rounds 2] [--global-batch 4096] [--hidden 256]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.arena_max=1")
CONFIGS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4)]  # (processes, devices each)
QUICK_CONFIGS = [(1, 1), (1, 2), (2, 1), (2, 2)]


def import_harness():
  """tests/multiprocess_harness.py: the launcher and the worker; imports JAX, so call it after
  the environment is set."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  from tests import multiprocess_harness
  return multiprocess_harness


def time_config(harness, processes: int, devices: int, args, out: Path) -> dict[str, float]:
  """Seconds per step of every variant and dataset for one configuration (slowest process)."""
  total = processes * devices
  argv = ["--num-processes", str(processes), "--devices-per-process", str(devices),
          "--rows-per-device", str(args.global_batch // total), "--hidden", str(args.hidden),
          "--steps", "0", "--timing-steps", str(args.steps), "--out", str(out),
          "--job-timeout", "300", "--skip-dataset-stats",
          "--peer-norms", "flax", "none"]
  job = harness.parse_args(argv)
  codes = harness.run_job(job)
  if any(code != 0 for code in codes):
    logs = "\n".join((out / f"worker{i}.log").read_text()[-2000:] for i in range(processes))
    raise RuntimeError(f"{processes} x {devices}: workers exited with {codes}\n{logs}")
  timings = [json.loads((out / f"timings-process{i}.json").read_text())
             for i in range(processes)]
  return {key: max(t[key] for t in timings) for key in timings[0]}


def collective_counts(harness) -> list[tuple[str, str, dict[str, int], dict[str, int]]]:
  """(variant, dataset, per-layer forward collectives, all collectives) on 8 host devices."""
  from jax.sharding import AxisType
  rows = []
  config = harness.Config(1, 8, 4, 1, 16, 0.05, 0)
  for variant, axis_type in (("shard_map", AxisType.Explicit), ("jit", AxisType.Explicit),
                             ("jit", AxisType.Auto)):
    for dataset in harness.DATASETS:
      found = harness.collectives(harness.compiled_step_text(config, variant, dataset, axis_type))
      everything = collections.Counter(kind for kind, _ in found)
      per_layer = collections.Counter()
      for kind, name in found:
        layer = harness.forward_layer(name)
        if layer:
          per_layer[f"{layer} {kind}"] += 1
      label = f"{variant} ({'explicit' if axis_type == AxisType.Explicit else 'auto'} mesh)"
      rows.append((label, dataset, dict(per_layer), dict(everything)))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="1 and 2 devices, 1 and 2 processes, few steps, one round")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, quick 5)")
  parser.add_argument("--global-batch", type=int, default=None,
                      help="rows per step over all devices (default 4096, quick 512)")
  parser.add_argument("--hidden", type=int, default=256)
  args = parser.parse_args(argv)
  args.steps = args.steps or (5 if args.quick else 20)
  args.global_batch = args.global_batch or (512 if args.quick else 4096)
  rounds = 1 if args.quick else args.rounds
  configs = QUICK_CONFIGS if args.quick else CONFIGS
  os.environ["GLIBC_TUNABLES"] = GLIBC_TUNABLES
  # This process compiles on 8 host devices to count collectives; workers set their own.
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  import jax
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", 8)
  harness = import_harness()

  samples: dict[tuple[int, int], list[dict[str, float]]] = collections.defaultdict(list)
  with tempfile.TemporaryDirectory(prefix="jaxnorm-scaling-") as tmp:
    for round_index in range(rounds):
      for processes, devices in configs:
        out = Path(tmp) / f"r{round_index}-{processes}x{devices}"
        samples[(processes, devices)].append(time_config(harness, processes, devices, args, out))

  keys = harness.timing_keys()
  print(f"# Synchronized BatchNorm: time per training step (ms), global batch "
        f"{args.global_batch} x {harness.FEATURES} features, hidden {args.hidden}, 2 BatchNorm "
        f"layers, SGD; all_gather: one norm layer's statistics gathered alone")
  print(f"\nMedian over {args.steps} steps and {rounds} round(s), slowest process; "
        f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}.\n")
  print("| processes x devices | devices | " + " | ".join(keys) + " |")
  print("|---|---:|" + "---:|" * len(keys))
  for processes, devices in configs:
    rounds_of = samples[(processes, devices)]
    cells = [f"{1e3 * statistics.median(r[key] for r in rounds_of):.2f}" for key in keys]
    print(f"| {processes} x {devices} | {processes * devices} | " + " | ".join(cells) + " |")

  print("\n# Collectives in the compiled training step on 8 host devices\n")
  print("| step | data | per norm layer (forward) | whole step (forward, backward, update) |")
  print("|---|---|---|---|")
  for label, dataset, per_layer, everything in collective_counts(harness):
    layer_text = ", ".join(f"{k}: {v}" for k, v in sorted(per_layer.items())) or "-"
    all_text = ", ".join(f"{k}: {v}" for k, v in sorted(everything.items()))
    print(f"| {label} | {dataset} | {layer_text} | {all_text} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
