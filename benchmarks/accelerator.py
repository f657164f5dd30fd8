"""Layer and RMS norm on a GPU or TPU: XLA path, Pallas kernels and flax, against copy bandwidth.

For LN and RMS, and the fused residual add + LN / RMS (``add_layer_norm``, ``add_rms_norm``:
``h = x + residual; y = norm(h)``, returning both), forward and forward+backward, shapes 4096x1024, 4096x4096, 16384x8192 and
32768x12288 in float32 and bfloat16 (scale and bias in the input's dtype, so the output is too),
under ``jax.jit`` on the default device:

- ``copy``: the measured device-to-device copy bandwidth (``-x`` on a 1.5 GiB array: read and
  write; bytes moved over time), the speed limit every other figure is a percentage of;
- ``xla``: ``jaxnorm.layer_norm`` / ``rms_norm`` with ``JAXNORM_KERNELS=xla`` (the default);
- ``pallas``: the same calls inside ``jaxnorm.kernels("pallas")`` (the Pallas kernels, handed
  the input in its own dtype by the dispatch);
- ``kernel``: the kernels called directly on the input's own dtype (what the kernels do alone);
- ``flax``: ``flax.linen.LayerNorm`` / ``RMSNorm`` (after ``x + residual`` for the fused ops).

Each figure is the median over rounds (the implementations take turns within a round) of the
time per call, after a warm-up; compilation is timed apart. Percent of copy bandwidth counts the
least bytes the op must move: forward reads x and writes y (2N); forward+backward (y, dx,
d scale, d bias from x and a given dy) reads x and dy and writes y and dx (4N). The fused add
doubles both: forward reads x and residual and writes y and h (4N); its backward reads h, dy and
dh and writes one cotangent, shared by x and residual (4N more: 8N in all). ``max|d|`` is the
largest difference of each output from the XLA path's, on data with mean 1e3 and std 1 (for
the fused ops, a branch ``x`` near 0 added to a residual stream at 1e3 in float32, near 0 in
bfloat16: a bfloat16 ``h`` at 1e3 keeps nothing of a std of 1 (its ulp is 4), and there XLA's
``y``, computed from ``h`` before rounding (excess precision), differs from the kernel's, the
norm of the rounded ``h``).

Without a GPU or TPU it prints why and exits with status 0 (CI runs it so). A kernel should
become the default on a platform only where it beats the XLA path by 10% or more there
(the last lines say where it does).

Run: python benchmarks/accelerator.py [--quick] [--rounds 7] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SHAPES = [(4096, 1024), (4096, 4096), (16384, 8192), (32768, 12288)]
QUICK_SHAPES = [(4096, 1024)]
DTYPES = ("float32", "bfloat16")
OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
MODES = ("fwd", "fwd+bwd")
IMPLEMENTATIONS = ("xla", "pallas", "kernel", "flax")


def accelerator():
  """The default device if it is a GPU or TPU, else ``None``."""
  import jax
  device = jax.devices()[0]
  return device if device.platform in ("gpu", "tpu") else None


def time_per_call(fn, args, calls):
  import jax
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def copy_bandwidth(rounds, calls, shape=(32768, 12288)):
  """Bytes read plus written per second by a device-to-device pass, ``-x``, over 1.5 GiB."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones(shape, jnp.float32)
  negate = jax.jit(lambda x: -x)
  jax.block_until_ready(negate(x))
  seconds = statistics.median(time_per_call(negate, (x,), calls) for _ in range(rounds))
  return 2 * x.nbytes / seconds


def functions(op, shape, dtype, mode, platform):
  """{implementation: (jitted function, args)} for one case."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  import jaxnorm
  from jaxnorm._src.fast import pallas as pallas_paths
  from jaxnorm._src.fast import pallas_add
  from jaxnorm._src.fast import pallas_blocks
  from jaxnorm._src.fast import pallas_rows

  rows, features = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape, np.float32) + 1e3, dtype)
  dy = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  fused = op.startswith("add_")
  residual = jnp.asarray(rng.standard_normal(shape, np.float32)
                         + (1e3 if dtype == "float32" else 0.0), dtype)
  if fused:  # x is the branch, near 0; the residual stream carries the offset
    x = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  inputs = (x, residual) if fused else (x,)
  cotangents = (dy, jnp.asarray(rng.standard_normal(shape, np.float32), dtype)) if fused else dy
  scale = jnp.asarray(1 + 0.1 * rng.standard_normal(features, np.float32), dtype)
  bias = jnp.asarray(0.1 * rng.standard_normal(features, np.float32), dtype)
  params = (scale, bias) if op.endswith("layer_norm") else (scale,)
  layout = pallas_paths.PLATFORM_LAYOUTS["cuda" if platform == "gpu" else platform]
  plan = pallas_blocks.plan_for(layout, rows, features, x.dtype, interpret=platform == "cpu")
  spec = pallas_rows.Spec(1e-6, x.dtype, plan) if plan else None

  add = pallas_add.AddSpec(spec, x.dtype, x.dtype, x.dtype) if spec else None

  def jaxnorm_op(mode_name):
    def norm(*args):
      with jaxnorm.kernels(mode_name):
        return getattr(jaxnorm, op)(*args, epsilon=1e-6)
    return norm

  def kernel_op(*args):
    if op == "layer_norm":
      return pallas_rows.layer_norm_rows(*args, spec)[0]
    if op == "rms_norm":
      return pallas_rows.rms_norm_rows(*args, spec)
    if op == "add_layer_norm":
      return pallas_add.add_layer_norm_rows(*args, add)
    return pallas_add.add_rms_norm_rows(*args, add)

  layer = (nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=dtype)
           if op.endswith("layer_norm")
           else nn.RMSNorm(epsilon=1e-6, dtype=dtype, param_dtype=dtype))
  names = ("scale", "bias")[:len(params)]

  def flax_op(*args):
    variables = {"params": dict(zip(names, args[len(inputs):]))}
    if not fused:
      return layer.apply(variables, args[0])
    h = args[0] + args[1]
    return layer.apply(variables, h), h

  norms = {"xla": jaxnorm_op("xla"), "pallas": jaxnorm_op("pallas"), "flax": flax_op}
  if spec is not None:
    norms["kernel"] = kernel_op
  result = {}
  for name, norm in norms.items():
    if mode == "fwd":
      result[name] = (jax.jit(norm), (*inputs, *params))
    else:
      def step(cotangents, *args, norm=norm):
        y, pullback = jax.vjp(norm, *args)
        return y, pullback(cotangents)
      result[name] = (jax.jit(step), (cotangents, *inputs, *params))
  return result


def measure_case(op, shape, dtype, mode, platform, rounds, calls):
  import jax
  import numpy as np
  fns = functions(op, shape, dtype, mode, platform)
  compile_s, outputs = {}, {}
  for name, (fn, args) in fns.items():
    start = time.perf_counter()
    outputs[name] = jax.block_until_ready(fn(*args))
    compile_s[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (fn, args) in fns.items():
      times[name].append(time_per_call(fn, args, calls))
  reference = [np.asarray(o, np.float32) for o in jax.tree.leaves(outputs["xla"])]
  differences = {}
  for name, out in outputs.items():
    leaves = [np.asarray(o, np.float32) for o in jax.tree.leaves(out)]
    differences[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference))
  return {name: {"seconds": statistics.median(t), "compile_s": compile_s[name],
                 "max_diff_vs_xla": differences[name]} for name, t in times.items()}


def table(results, bandwidth):
  lines = [f"Copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + write).", "",
           "| op | mode | shape | dtype | " + " | ".join(
               f"{n} µs | {n} % copy" for n in IMPLEMENTATIONS)
           + " | xla/flax | kernel/flax | kernel/xla | max|d| kernel |",
           "|" + "---|" * (4 + 2 * len(IMPLEMENTATIONS) + 4)]
  for r in results:
    cells = []
    for name in IMPLEMENTATIONS:
      figure = r["figures"].get(name)
      if figure is None:
        cells += ["-", "-"]
        continue
      rate = r["min_bytes"] / figure["seconds"]
      cells += [f"{figure['seconds'] * 1e6:.0f}", f"{100 * rate / bandwidth:.0f}"]
    t = {name: f["seconds"] for name, f in r["figures"].items()}
    ratio = lambda a, b: f"{t[a] / t[b]:.2f}" if a in t and b in t else "-"  # noqa: E731
    kernel_diff = r["figures"].get("kernel", {}).get("max_diff_vs_xla")
    lines.append(f"| {r['op']} | {r['mode']} | {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | "
                 + " | ".join(cells) + f" | {ratio('xla', 'flax')} | {ratio('kernel', 'flax')} | "
                 f"{ratio('kernel', 'xla')} | "
                 f"{'-' if kernel_diff is None else f'{kernel_diff:.2g}'} |")
  return "\n".join(lines)


def verdict(results):
  """Where the kernels beat the XLA path by 10% or more (the bar for turning them on)."""
  wins = [f"{r['op']} {r['mode']} {r['shape'][0]}x{r['shape'][1]} {r['dtype']}"
          for r in results if "pallas" in r["figures"]
          and r["figures"]["pallas"]["seconds"] <= r["figures"]["xla"]["seconds"] / 1.1]
  return ("jaxnorm.kernels('pallas') beats the XLA path by >= 10% on: "
          + (", ".join(wins) if wins else "none of the cases"))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one shape, 2 rounds")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--calls", type=int, default=20, help="calls per timing")
  parser.add_argument("--json", help="write the raw figures to this file")
  parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  import jax
  device = accelerator()
  if args.cpu_smoke:  # the script's own code on a tiny shape, kernels in interpret mode
    device = jax.devices()[0]
  if device is None:
    print(f"no GPU or TPU (jax's default backend is {jax.default_backend()!r}): nothing to "
          "measure. Run this on a machine with one; on CPU the kernels are checked by "
          "tests/test_pallas.py (interpret mode and lowering) instead.")
    return 0
  rounds, calls = (2, 5) if args.quick else (args.rounds, args.calls)
  shapes = QUICK_SHAPES if args.quick else SHAPES
  if args.cpu_smoke:
    rounds, calls, shapes = 1, 1, [(16, 256)]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  bandwidth = copy_bandwidth(rounds, calls, (1024, 1024) if args.cpu_smoke else (32768, 12288))
  results = []
  for op in OPS:
    for mode in MODES:
      for shape in shapes:
        for dtype in DTYPES:
          import jax.numpy as jnp
          size = shape[0] * shape[1] * jnp.dtype(dtype).itemsize
          figures = measure_case(op, shape, dtype, mode, device.platform, rounds, calls)
          passes = (2 if mode == "fwd" else 4) * (2 if op.startswith("add_") else 1)
          results.append({"op": op, "mode": mode, "shape": shape, "dtype": dtype,
                          "min_bytes": size * passes, "figures": figures})
          print(f"{op} {mode} {shape} {dtype}: " + ", ".join(
              f"{n} {f['seconds'] * 1e6:.0f} µs" for n, f in figures.items()), flush=True)
  print()
  print(table(results, bandwidth))
  print()
  print(verdict(results) if not args.cpu_smoke else
        "(CPU smoke run: kernels in interpret mode, one call; the figures mean nothing)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": device.device_kind, "copy_bytes_per_s": bandwidth,
                 "results": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
