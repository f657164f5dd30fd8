"""Speed of fitting dataset statistics and of standardizing with them.

Fitting: ``jaxnorm.fit_stats`` over batches (host, float64, exact; with and without the quantile
sketches), ``jaxnorm.device_stats`` under ``jit`` (one device, float32, no quantiles), against
NumPy's ``mean`` and ``std`` over the whole array in memory (its defaults, and in float64), and
``np.quantile`` for the quartiles, on (100000, 1024) float32 (about 400 MB, offset 1000 so that
accuracy differs) and on uint8 images (256, 224, 224, 3). Each time is the median of the rounds;
the accuracy column is the largest relative error of the variance against a float64 two-pass
reference.

Standardizing: ``jaxnorm.standardize`` with fitted statistics and the ``linen.Standardize``
layer under ``jit``, against a plain memory pass over the same array (``x * a + b``, float32
out) timed in the same rounds, alternating; each figure is the median of per-round ratios.

The machine is shared: read ratios taken side by side, not absolute times.

Run: python benchmarks/input_stats.py [--quick] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.arena_max=1")


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def batches_of(x, rows):
  return [x[i:i + rows] for i in range(0, len(x), rows)]


def fitting_table(name, x, batch_rows, rounds, quantile_rounds):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxnorm

  flat = x.reshape(-1, x.shape[-1])
  reference_var = flat.astype(np.float64).var(axis=0)
  batches = batches_of(x, batch_rows)
  device_x = jnp.asarray(x)
  device_fit = jax.jit(lambda v: jaxnorm.device_stats(v))
  jax.block_until_ready(device_fit(device_x))
  axes = tuple(range(x.ndim - 1))

  def numpy_default():
    return x.mean(axis=axes), x.std(axis=axes)

  def numpy_float64():
    return x.mean(axis=axes, dtype=np.float64), x.std(axis=axes, dtype=np.float64)

  candidates = {
      "numpy mean+std (default dtype)": (numpy_default, lambda r: r[1] ** 2),
      "numpy mean+std (float64)": (numpy_float64, lambda r: r[1] ** 2),
      "fit_stats, moments only": (lambda: jaxnorm.fit_stats(batches, quantiles=False),
                                  lambda r: r.var),
      "fit_stats, with quantiles": (lambda: jaxnorm.fit_stats(batches), lambda r: r.var),
      "device_stats (jit, float32)": (
          lambda: jax.block_until_ready(device_fit(device_x)), lambda r: np.asarray(r.var)),
  }
  times = {k: [] for k in candidates}
  errors = {}
  for _ in range(rounds):
    for label, (fn, var_of) in candidates.items():
      start = time.perf_counter()
      result = fn()
      times[label].append(time.perf_counter() - start)
      errors[label] = float(np.max(np.abs(np.asarray(var_of(result), np.float64) - reference_var)
                                   / reference_var))
  quantile_times = [timed(lambda: np.quantile(flat, [0.25, 0.5, 0.75], axis=0))
                    for _ in range(quantile_rounds)]
  baseline = statistics.median(times["numpy mean+std (default dtype)"])
  gigabytes = x.nbytes / 1e9
  print(f"\nfitting statistics of {name}: shape {x.shape} {x.dtype}, {gigabytes * 1e3:.0f} MB, "
        f"batches of {batch_rows}")
  print(f"{'method':<32} {'median s':>9} {'GB/s':>7} {'x numpy':>8} {'var rel. error':>15}")
  for label in candidates:
    t = statistics.median(times[label])
    print(f"{label:<32} {t:9.3f} {gigabytes / t:7.2f} {t / baseline:8.2f} "
          f"{errors[label]:15.1e}")
  t = statistics.median(quantile_times)
  print(f"{'np.quantile (q25, median, q75)':<32} {t:9.3f} {gigabytes / t:7.2f} "
        f"{t / baseline:8.2f} {'-':>15}")


def standardize_table(shapes, rounds, calls):
  import flax  # noqa: F401 - imported before timing
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxnorm
  import jaxnorm.linen as jnn

  print("\nstandardizing with fitted statistics (jit), times the memory pass x * a + b "
        "(float32 out) in the same rounds")
  print(f"{'input':<28} {'memory ms':>10} {'standardize':>12} {'linen layer':>12} "
        f"{'XLA bytes/min':>14}")
  rng = np.random.default_rng(0)
  for shape, dtype in shapes:
    if dtype == "uint8":
      host = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
      host = (rng.standard_normal(shape, dtype=np.float32) * 3 + 100).astype(np.float32)
    stats = jaxnorm.fit_stats(host)
    x = jnp.asarray(host)
    a, b = jnp.float32(1.5), jnp.float32(0.25)
    layer = jnn.Standardize(stats=stats)
    variables = layer.init(jax.random.key(0), x[:1])
    functions = {
        "memory": jax.jit(lambda v: v.astype(jnp.float32) * a + b),
        "standardize": jax.jit(lambda v: jaxnorm.standardize(v, stats)),
        "layer": jax.jit(lambda v: layer.apply(variables, v)),
    }
    for fn in functions.values():
      jax.block_until_ready(fn(x))
    compiled = functions["standardize"].lower(x).compile().cost_analysis()
    compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
    minimum = host.nbytes + host.size * 4
    planned = float(compiled.get("bytes accessed", float("nan"))) / minimum
    per_round = {k: [] for k in functions}
    for _ in range(rounds):
      for name, fn in functions.items():
        start = time.perf_counter()
        for _ in range(calls):
          out = fn(x)
        jax.block_until_ready(out)
        per_round[name].append((time.perf_counter() - start) / calls)
    ratio = {k: statistics.median(t / m for t, m in zip(per_round[k], per_round["memory"]))
             for k in functions}
    memory_ms = statistics.median(per_round["memory"]) * 1e3
    print(f"{str(shape) + ' ' + dtype:<28} {memory_ms:10.2f} {ratio['standardize']:12.3f} "
          f"{ratio['layer']:12.3f} {planned:14.2f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, 2 rounds")
  parser.add_argument("--rounds", type=int, default=None)
  args = parser.parse_args(argv)
  if os.environ.get("GLIBC_TUNABLES") != GLIBC_TUNABLES and argv is None:
    # glibc serves allocations of 32 MiB and more as fresh mmaps, so every run of a large output
    # would also time the kernel's page faults on new memory: restart with glibc's mmap and trim
    # thresholds raised to 4 GiB (one arena), which keeps those buffers in the heap and reuses
    # them from one round to the next.
    os.execve(sys.executable, [sys.executable] + sys.argv,
              {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES})
  import jax
  import numpy as np

  rounds = args.rounds or (2 if args.quick else 5)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
        f"{rounds} rounds; the machine is shared, so times are noisy: compare ratios")
  rng = np.random.default_rng(0)
  rows = 10000 if args.quick else 100000
  table = (rng.standard_normal((rows, 1024), dtype=np.float32) + 1000).astype(np.float32)
  fitting_table("a float32 table", table, 4096, rounds, 1)
  del table
  images = rng.integers(0, 256, (16 if args.quick else 256, 224, 224, 3), dtype=np.uint8)
  fitting_table("uint8 images", images, 16, rounds, 1)
  del images
  shapes = ([((256, 1024), "float32"), ((8, 224, 224, 3), "uint8")] if args.quick else
            [((8192, 1024), "float32"), ((256, 224, 224, 3), "uint8")])
  standardize_table(shapes, rounds, 3 if args.quick else 10)


if __name__ == "__main__":
  main()
