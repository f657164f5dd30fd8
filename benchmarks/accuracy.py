"""Accuracy of standardization far from zero: jaxnorm against flax's fast and two-pass variance.

For each offset 1e0, 1e1, ..., 1e7 and input dtype (float32, bfloat16), data with standard
deviation 1 around the offset is standardized along the reduced axes by

- ``jaxnorm.reduce_moments(x, axes).standardize(x, eps)``: jaxnorm's moments, normalized in
  their shifted frame ``((x - K) - (mean - K)) / sigma`` (what every jaxnorm norm does),
- the jaxnorm.linen layer (the same statistics, through the layer),
- ``(x - mean) * rsqrt(var + eps)`` with the float32 ``mean, var`` that ``jaxnorm.moments``
  returns: exact statistics, but a float32 mean of data around 1e7 is itself rounded to a
  spacing of 1, so outside the shifted frame no float32 formula can do better than about
  ulp(offset) / 2 / std,
- the flax.linen layer with its default ``use_fast_variance=True`` (E[x²] − E[x]²),
- the flax.linen layer with ``use_fast_variance=False`` (two passes in float32),

and the table gives the largest absolute error of the output against a float64 NumPy
reference computed on the *same* input values (after rounding to the input dtype), so only the
statistics' and normalization's own error is counted. Layers run with their default epsilon
(LayerNorm 1e-6, BatchNorm 1e-5), which the reference uses too, and float32 parameters, so every
output is float32. Deterministic: no timing.

LayerNorm is measured twice: below 4096 rows, and from 4096 rows, where on CPU jaxnorm's
LayerNorm takes the fused kernel's formulas (``stats.fused_row_moments``).

Run: python benchmarks/accuracy.py [--quick]
"""
from __future__ import annotations

import argparse
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxnorm
import jaxnorm.linen as jnn

OFFSETS = [10.0 ** k for k in range(8)]
DTYPES = ["float32", "bfloat16"]
METHODS = ["jaxnorm reduce_moments", "jaxnorm layer", "x - jaxnorm.moments mean", "flax default",
           "flax two-pass"]


def layers(kind: str) -> dict:
  """Three of the standardizations of ``kind`` ("LayerNorm" or "BatchNorm") as Linen-like pairs."""
  if kind == "LayerNorm":
    return {"jaxnorm layer": jnn.LayerNorm(), "flax default": nn.LayerNorm(),
            "flax two-pass": nn.LayerNorm(use_fast_variance=False)}
  return {"jaxnorm layer": jnn.BatchNorm(use_running_average=False),
          "flax default": nn.BatchNorm(use_running_average=False),
          "flax two-pass": nn.BatchNorm(use_running_average=False, use_fast_variance=False)}


def standardizers(kind: str, example: jax.Array) -> dict:
  """{method: jitted x -> float32 standardized x}, reducing over the axes of ``kind``."""
  axes = (-1,) if kind == "LayerNorm" else (0,)
  epsilon = 1e-6 if kind == "LayerNorm" else 1e-5

  def shifted_frame(x):
    moments = jaxnorm.reduce_moments(x, axes)
    return moments.standardize(x.astype(moments.var.dtype), epsilon)

  def from_mean_and_var(x):
    mean, var = jaxnorm.moments(x, axes, keepdims=True)
    return (x.astype(mean.dtype) - mean) * jax.lax.rsqrt(var + epsilon)

  result = {"jaxnorm reduce_moments": jax.jit(shifted_frame),
            "x - jaxnorm.moments mean": jax.jit(from_mean_and_var)}
  for name, layer in layers(kind).items():
    variables = jax.jit(layer.init)(jax.random.key(0), example)  # not an eager forward pass
    apply = functools.partial(layer.apply, variables, mutable=["batch_stats"])
    result[name] = jax.jit(lambda x, apply=apply: apply(x)[0])
  return result, axes, epsilon


def reference(x: np.ndarray, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + epsilon)


def errors(kind: str, shape: tuple[int, ...], seed: int = 0) -> dict:
  """{(dtype, offset): {method: max abs error}}."""
  rng = np.random.default_rng(seed)
  noise = rng.standard_normal(shape)
  table = {}
  for dtype in DTYPES:
    functions, axes, epsilon = standardizers(kind, jnp.zeros(shape, dtype))
    for offset in OFFSETS:
      x = jnp.asarray(noise + offset, dtype)  # rounded once, from float64
      expected = reference(np.asarray(x.astype(jnp.float32)), axes, epsilon)
      row = {}
      for method, fn in functions.items():
        y = np.asarray(fn(x), np.float64)
        row[method] = float(np.max(np.abs(y - expected))) if np.all(np.isfinite(y)) else np.nan
      table[(dtype, offset)] = row
  return table


def markdown(kind: str, shape: tuple[int, ...], table: dict) -> str:
  axes = "the last axis" if kind == "LayerNorm" else "axis 0"
  fused = " (4096 rows or more: on CPU, jaxnorm's fused row kernel)" if shape[0] >= 4096 else ""
  lines = [f"{kind}, x of shape {shape}{fused} with std 1 around the offset, standardized over "
           f"{axes}: max |error| against float64 on the same input",
           "",
           "| input | offset | " + " | ".join(METHODS) + " |",
           "|---|---|" + "---:|" * len(METHODS)]
  for (dtype, offset), row in table.items():
    cells = " | ".join("NaN/Inf" if np.isnan(row[m]) else f"{row[m]:.1e}" for m in METHODS)
    lines.append(f"| {dtype} | 1e{int(round(np.log10(offset)))} | {cells} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small shapes (a few seconds)")
  args = parser.parse_args(argv)
  cases = ({"LayerNorm": ("LayerNorm", (32, 256)), "LayerNorm rows": ("LayerNorm", (4096, 16)),
            "BatchNorm": ("BatchNorm", (256, 32))} if args.quick else
           {"LayerNorm": ("LayerNorm", (256, 1024)),
            "LayerNorm rows": ("LayerNorm", (8192, 256)),
            "BatchNorm": ("BatchNorm", (1024, 256))})
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
  results = {}
  for name, (kind, shape) in cases.items():
    results[name] = errors(kind, shape)
    print()
    print(markdown(kind, shape, results[name]))
  sys.stdout.flush()
  return results


if __name__ == "__main__":
  main()
