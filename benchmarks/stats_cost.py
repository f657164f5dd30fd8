"""Cost of jaxnorm's stable statistics against flax's fast ones, side by side in one process.

For a LayerNorm-shaped input (8192, 1024), reduced over the last axis, and a BatchNorm-shaped
input (32, 56, 56, 128), reduced over all but the channels, it times under ``jax.jit`` (after a
warm-up, with ``block_until_ready``), forward and forward+backward:

- the statistics alone: ``jaxnorm.moments`` against flax's ``_compute_stats`` with
  ``use_fast_variance=True`` (its default, E[x²] − E[x]²) and ``False`` (two passes);
  forward+backward is the gradient of a weighted sum of mean and variance with respect to x;
- the normalization layer: ``jaxnorm.linen.LayerNorm`` / ``BatchNorm(use_running_average=False)``
  against the ``flax.linen`` layer, default and two-pass; forward gives y (and the new running
  statistics), forward+backward gives y, dx, d(scale), d(bias) (and the running statistics);
- the speed limit: a plain memory pass ``x * a + b`` (reads x, writes y: 2N bytes), and for
  forward+backward a pass with two outputs (4N bytes).

Every candidate runs in the same process; the rounds alternate between them (A B C ... A B C,
in a rotated order), and each figure is the median over rounds of the per-round ratio: to the
memory pass ("x mem"), and jaxnorm's to flax's fast variance ("/ flax"). Absolute times on a
shared machine are noisy; the ratios are what to read. XLA's planned bytes (cost analysis) over
the 2N (forward) or 4N (forward+backward) minimum and the compile times are printed beside them.

Under default glibc, outputs of 32 MiB and more are fresh mmaps and every run times page faults:
the script re-executes itself once with ``GLIBC_TUNABLES`` raising glibc's mmap and trim
thresholds to 4 GiB (one arena), so that large buffers stay in the heap and are reused from one
round to the next, unless it is already set or ``--no-reexec`` is given.

Run: python benchmarks/stats_cost.py [--quick] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296:"
                  "glibc.malloc.arena_max=1")

CASES = {"LayerNorm": (8192, 1024), "BatchNorm": (32, 56, 56, 128)}
QUICK_CASES = {"LayerNorm": (512, 256), "BatchNorm": (8, 16, 16, 32)}
QUICK_SECONDS = 0.01  # --quick: each candidate timed over about this long a round
PEERS = ("jaxnorm", "flax fast", "flax two-pass")
MODES = ("fwd", "fwd+bwd")


def reexec_with_tunables(argv: list[str]) -> None:
  """Starts this script again with GLIBC_TUNABLES set (malloc settings apply at start only)."""
  if os.environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES or "--no-reexec" in argv:
    return
  env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv, "--no-reexec"],
            env)


def candidates(kind: str, shape: tuple[int, ...], mode: str) -> dict:
  """{name: (jitted function, args)} for the memory pass and every peer, statistics and layer."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax.linen import normalization as flax_normalization

  import jaxnorm
  import jaxnorm.linen as jnn

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  channels = shape[-1]
  axes = (len(shape) - 1,) if kind == "LayerNorm" else tuple(range(len(shape) - 1))
  weights = jnp.asarray(rng.standard_normal((2, channels)), jnp.float32)
  if kind == "LayerNorm":
    weights = jnp.asarray(rng.standard_normal((2,) + shape[:-1]), jnp.float32)
  a, b = jnp.float32(1.5), jnp.float32(0.5)
  result = {}

  if mode == "fwd":
    result["memory pass"] = (jax.jit(lambda x: x * a + b), (x,))
  else:
    result["memory pass"] = (jax.jit(lambda x: (x * a + b, x * b - a)), (x,))

  statistics_of = {
      "jaxnorm": lambda x: jaxnorm.moments(x, axes),
      "flax fast": lambda x: flax_normalization._compute_stats(x, axes, None,
                                                               use_fast_variance=True),
      "flax two-pass": lambda x: flax_normalization._compute_stats(x, axes, None,
                                                                   use_fast_variance=False),
  }
  for peer, stats in statistics_of.items():
    if mode == "fwd":
      fn = jax.jit(stats)
    else:
      def loss(x, stats=stats):
        mean, var = stats(x)
        return jnp.sum(weights[0] * mean) + jnp.sum(weights[1] * var)
      fn = jax.jit(jax.value_and_grad(loss))
    result[f"stats: {peer}"] = (fn, (x,))

  if kind == "LayerNorm":
    layers = {"jaxnorm": jnn.LayerNorm(), "flax fast": nn.LayerNorm(),
              "flax two-pass": nn.LayerNorm(use_fast_variance=False)}
  else:
    layers = {"jaxnorm": jnn.BatchNorm(use_running_average=False),
              "flax fast": nn.BatchNorm(use_running_average=False),
              "flax two-pass": nn.BatchNorm(use_running_average=False, use_fast_variance=False)}
  cotangent = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  for peer, layer in layers.items():
    variables = jax.jit(layer.init)(jax.random.key(0), x)  # not an eager forward pass
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    def apply(params, x, layer=layer, state=state):
      return layer.apply({"params": params, **state}, x, mutable=list(state))

    if mode == "fwd":
      fn = jax.jit(apply)
    else:
      def train_step(params, x, apply=apply):
        (y, updates), pullback = jax.vjp(apply, params, x)
        zero_updates = jax.tree.map(jnp.zeros_like, updates)
        dparams, dx = pullback((cotangent, zero_updates))
        return y, updates, dparams, dx
      fn = jax.jit(train_step)
    result[f"layer: {peer}"] = (fn, (params, x))
  return result, x.size * x.dtype.itemsize


def block(tree) -> None:
  import jax
  jax.block_until_ready(tree)


def time_calls(fn, args, calls: int) -> float:
  """Seconds per call, over ``calls`` calls each waited for."""
  start = time.perf_counter()
  for _ in range(calls):
    block(fn(*args))
  return (time.perf_counter() - start) / calls


def planned_bytes(fn, args) -> float:
  try:
    analysis = fn.lower(*args).compile().cost_analysis()
    if isinstance(analysis, list):
      analysis = analysis[0]
    return float(analysis.get("bytes accessed", float("nan")))
  except Exception:  # cost analysis is best effort: not every backend gives it
    return float("nan")


def measure(kind: str, shape: tuple[int, ...], mode: str, rounds: int,
            seconds: float = 0.05) -> dict:
  """{name: {"ms", "x mem", "/ flax", "bytes", "compile s"}} for one shape and mode.

  Each candidate is timed over as many calls (3 to 50) as the memory pass makes in ``seconds``.
  """
  functions, nbytes = candidates(kind, shape, mode)
  compile_s, planned = {}, {}
  for name, (fn, args) in functions.items():
    start = time.perf_counter()
    block(fn(*args))  # compile and warm up
    compile_s[name] = time.perf_counter() - start
    block(fn(*args))
    planned[name] = planned_bytes(fn, args)
  single = time_calls(*functions["memory pass"], 3)
  calls = max(3, min(50, int(seconds / max(single, 1e-6))))
  names = list(functions)
  per_round = []  # {name: seconds per call}, one dict a round
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    per_round.append({name: time_calls(*functions[name], calls) for name in order})
  minimum = (2 if mode == "fwd" else 4) * nbytes
  result = {}
  for name in names:
    ratios = [t[name] / t["memory pass"] for t in per_round]
    group = name.split(":")[0]
    flax_name = f"{group}: flax fast"
    versus = ([t[name] / t[flax_name] for t in per_round]
              if flax_name in functions else [float("nan")])
    result[name] = {
        "ms": 1e3 * statistics.median(t[name] for t in per_round),
        "x mem": statistics.median(ratios),
        "/ flax": statistics.median(versus),
        "bytes": planned[name] / minimum,
        "compile s": compile_s[name],
    }
  return result


def markdown(results: dict) -> str:
  lines = ["| shape | what | mode | memory pass ms | jaxnorm x mem | flax fast x mem | "
           "flax two-pass x mem | jaxnorm / flax fast | flax two-pass / flax fast | "
           "planned bytes / min (jaxnorm, flax fast, two-pass) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
  for (kind, shape, mode), rows in results.items():
    for group in ("stats", "layer"):
      peer = {p: rows[f"{group}: {p}"] for p in PEERS}
      what = f"{kind} {'statistics' if group == 'stats' else 'layer'}"
      planned = ", ".join(f"{peer[p]['bytes']:.2f}" for p in PEERS)
      lines.append(
          f"| {'x'.join(map(str, shape))} | {what} | {mode} | {rows['memory pass']['ms']:.2f} | "
          f"{peer['jaxnorm']['x mem']:.2f} | {peer['flax fast']['x mem']:.2f} | "
          f"{peer['flax two-pass']['x mem']:.2f} | {peer['jaxnorm']['/ flax']:.2f} | "
          f"{peer['flax two-pass']['/ flax']:.2f} | {planned} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (seconds)")
  parser.add_argument("--rounds", type=int, default=None, help="rounds (default 7, quick 3)")
  parser.add_argument("--no-reexec", action="store_true",
                      help="do not restart with GLIBC_TUNABLES set")
  args = parser.parse_args(argv)
  if __name__ == "__main__":
    reexec_with_tunables(argv)
  import jax

  rounds = args.rounds or (3 if args.quick else 7)
  cases = QUICK_CASES if args.quick else CASES
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"float32, {rounds} rounds, GLIBC_TUNABLES "
        f"{'set' if os.environ.get('GLIBC_TUNABLES') == GLIBC_TUNABLES else 'NOT set'}")
  results = {}
  for kind, shape in cases.items():
    for mode in MODES:
      results[(kind, shape, mode)] = measure(kind, shape, mode, rounds,
                                             QUICK_SECONDS if args.quick else 0.05)
  print()
  print(markdown(results))
  print()
  print("x mem: median over rounds of time / memory pass time (same round); "
        "jaxnorm / flax fast: median of per-round ratios. Compile seconds:")
  for (kind, shape, mode), rows in results.items():
    print(f"  {kind} {mode}: " + ", ".join(f"{name} {row['compile s']:.2f}"
                                          for name, row in rows.items()))
  sys.stdout.flush()
  return results


if __name__ == "__main__":
  main()
