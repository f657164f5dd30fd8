"""Fused residual add + norm against the separate add and norm: XLA's planned bytes and time.

For ``h = x + residual; y = norm(h)`` on float32 (8192, 1024) rows, forward (returns ``y`` and
``h``) and forward+backward (the gradients of ``<y, gy> + <h, gh>`` with respect to ``x``,
``residual``, ``scale`` and ``bias``), it compares:

- ``jaxnorm.add_layer_norm`` / ``add_rms_norm`` under one ``jit``;
- the same add and norm written apart, under one ``jit``;
- the add and the norm as two jitted calls (what an unfused framework runs);
- flax.linen's ``LayerNorm`` / ``RMSNorm`` after the add, under one ``jit``.

Planned bytes are XLA's ``cost_analysis()["bytes accessed"]`` over the least any implementation
must move: forward reads x and residual and writes y and h (4 arrays), forward+backward reads
x, residual, gy and gh and writes two gradients (6 arrays). Times are medians over rounds (the
functions take turns within each round), also as multiples of a memory pass (``x * a + b``:
read and write one array; two such passes for forward+backward, as benchmarks/speed.py).

Run: python benchmarks/fused_add_norm.py [--quick] [--rounds 7] [--shape 8192x1024]
"""
from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm


def planned_bytes(fn, args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["bytes accessed"])


def norm_of(norm_kind: str, h, scale, bias):
  """jaxnorm's layer norm (with scale and bias) or RMS norm (scale) of ``h``."""
  if norm_kind == "layer":
    return jaxnorm.layer_norm(h, scale, bias)
  return jaxnorm.rms_norm(h, scale)


def separate(norm_kind: str):
  """``h = x + residual`` and the norm of ``h``, written apart."""
  def fn(x, residual, scale, bias):
    h = x + residual
    return norm_of(norm_kind, h, scale, bias), h
  return fn


def fused(norm_kind: str):
  if norm_kind == "layer":
    return jaxnorm.add_layer_norm
  return lambda x, residual, scale, bias: jaxnorm.add_rms_norm(x, residual, scale)


def flax_norm(norm_kind: str):
  layer = nn.LayerNorm() if norm_kind == "layer" else nn.RMSNorm()

  def fn(x, residual, scale, bias):
    h = x + residual
    params = {"scale": scale, "bias": bias} if norm_kind == "layer" else {"scale": scale}
    return layer.apply({"params": params}, h), h
  return fn


def training_step(forward):
  """Gradients of ``<y, gy> + <h, gh>`` with respect to x, residual, scale and bias."""
  def step(x, residual, scale, bias, gy, gh):
    _, vjp = jax.vjp(forward, x, residual, scale, bias)
    return vjp((gy, gh))
  return step


def two_calls(norm_kind: str, mode: str):
  """The add and the norm as separately jitted calls: [(jitted fn, args builder)]."""
  add = jax.jit(lambda x, residual: x + residual)
  norm = jax.jit(functools.partial(norm_of, norm_kind))
  if mode == "fwd":
    def run(x, residual, scale, bias):
      h = add(x, residual)
      return norm(h, scale, bias), h
    parts = [(add, lambda a: (a[0], a[1])), (norm, lambda a: (a[0], a[2], a[3]))]
    return run, parts

  def norm_step_fn(h, scale, bias, gy):
    _, vjp = jax.vjp(functools.partial(norm_of, norm_kind), h, scale, bias)
    return vjp(gy)
  norm_step = jax.jit(norm_step_fn)
  add_back = jax.jit(lambda dh, gh: (dh + gh, dh + gh))

  def run(x, residual, scale, bias, gy, gh):
    h = add(x, residual)
    dh, d_scale, d_bias = norm_step(h, scale, bias, gy)
    dx, d_residual = add_back(dh, gh)
    return dx, d_residual, d_scale, d_bias
  parts = [(add, lambda a: (a[0], a[1])), (norm_step, lambda a: (a[0], a[2], a[3], a[4])),
           (add_back, lambda a: (a[0], a[5]))]
  return run, parts


def measure(shape, rounds: int, calls: int):
  rng = np.random.default_rng(0)
  arrays = [jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4)]
  x, residual, gy, gh = arrays
  scale = jnp.asarray(rng.standard_normal(shape[-1:], dtype=np.float32))
  bias = jnp.asarray(rng.standard_normal(shape[-1:], dtype=np.float32))
  element_bytes = x.size * x.dtype.itemsize
  a, b = jnp.float32(1.5), jnp.float32(0.25)
  rows = []
  for norm_kind in ("layer", "rms"):
    for mode in ("fwd", "fwd+bwd"):
      args = (x, residual, scale, bias) if mode == "fwd" else (x, residual, scale, bias, gy, gh)
      wrap = (lambda f: f) if mode == "fwd" else training_step
      memory = (jax.jit(lambda x: x * a + b), (x,)) if mode == "fwd" else (
          jax.jit(lambda x, g: (x * a + b, g * b + a)), (x, gy))
      candidates = {"jaxnorm fused": jax.jit(wrap(fused(norm_kind))),
                    "separate, one jit": jax.jit(wrap(separate(norm_kind))),
                    "flax, one jit": jax.jit(wrap(flax_norm(norm_kind)))}
      split_run, parts = two_calls(norm_kind, mode)
      planned = {name: planned_bytes(fn, args) for name, fn in candidates.items()}
      planned["separate, two calls"] = sum(planned_bytes(fn, build(args)) for fn, build in parts)
      candidates["separate, two calls"] = split_run
      timed = {"memory": lambda: memory[0](*memory[1])}
      timed.update({name: bind(fn, args) for name, fn in candidates.items()})
      for fn in timed.values():
        jax.block_until_ready(fn())  # compile and warm up
      samples = {name: [] for name in timed}
      for round_index in range(rounds):
        names = list(timed)
        names = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in names:
          start = time.perf_counter()
          for _ in range(calls):
            jax.block_until_ready(timed[name]())
          samples[name].append((time.perf_counter() - start) / calls)
      minimum = (4 if mode == "fwd" else 6) * element_bytes
      for name in candidates:
        ratios = [t / m for t, m in zip(samples[name], samples["memory"])]
        rows.append((norm_kind, mode, name, planned[name] / minimum,
                     1e3 * statistics.median(samples[name]), statistics.median(ratios)))
  return rows


def bind(fn, args):
  """``fn`` with its arguments, to time."""
  return lambda: fn(*args)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small rows, one round")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--shape", default="8192x1024")
  args = parser.parse_args(argv)
  shape = (256, 1024) if args.quick else tuple(int(n) for n in args.shape.split("x"))
  rounds, calls = (1, 1) if args.quick else (args.rounds, 5)
  rows = measure(shape, rounds, calls)
  print(f"float32 {shape[0]}x{shape[1]}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, jax {jax.__version__}; medians over {rounds} rounds")
  print("\n| norm | pass | implementation | XLA bytes / min | ms | × mem |")
  print("|---|---|---|---|---|---|")
  for norm_kind, mode, name, bytes_ratio, ms, ratio in rows:
    print(f"| {norm_kind} | {mode} | {name} | {bytes_ratio:.2f} | {ms:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
  main()
