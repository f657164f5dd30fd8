"""The block layouts of the Pallas row kernels (:mod:`jaxnorm._src.fast.pallas_rows`).

A :class:`Plan` says how a ``(rows, features)`` array is cut into blocks of whole rows for one
layout: ``"triton"`` (GPU: power-of-two widths, masked edges, a row loop in the backward) or
``"mosaic"`` (TPU: the whole feature axis wide, a multiple of the sublane tile tall).
:func:`call` runs a kernel over the grid of a plan; :class:`Block` loads and stores one block
with the masks its layout needs.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
# Widest row a kernel holds at once; wider rows take the XLA path.
MAX_FEATURES = 32768
# Triton: elements of x a program reduces at once (rows per chunk = this / width, at least 1).
TRITON_CHUNK_ELEMENTS = 4096
# Triton backward: row chunks per program (fewer where there are few rows), and the number of
# programs below which it takes no more chunks.
TRITON_MAX_STEPS = 32
TRITON_MIN_PROGRAMS = 512
# Mosaic: bytes of a float32 block of x. The pipeline double-buffers every block (x, dy, dx in
# the backward) and the body holds a few float32 temporaries of the block's size: at 512 KiB
# that stays well inside the 16 MiB of VMEM a kernel gets by default.
MOSAIC_BLOCK_BYTES = 1 << 19


class Plan(NamedTuple):
  """How a ``(rows, features)`` array is cut into blocks for one layout.

  Attributes:
    layout: ``"triton"`` or ``"mosaic"``.
    rows, features: the array's shape.
    width: the block's width (``features``, or the next power of two for Triton).
    chunk_rows: rows reduced at once.
    steps: chunks per program in the backward kernels (1 in the forward).
    interpret: run in Pallas interpret mode (any platform; slow).
  """
  layout: str
  rows: int
  features: int
  width: int
  chunk_rows: int
  steps: int
  interpret: bool

  @property
  def padded(self) -> bool:
    return self.width != self.features

  def block_rows(self, backward: bool) -> int:
    return self.chunk_rows * (self.steps if backward else 1)

  def grid(self, backward: bool) -> int:
    return pl.cdiv(self.rows, self.block_rows(backward))


def plan_for(layout: str, rows: int, features: int, dtype: Any, *,
             interpret: bool = False) -> Plan | None:
  """The blocks of ``layout`` for a ``(rows, features)`` array of ``dtype``, or ``None``
  where that layout has no kernel for the shape (empty, or rows wider than
  :data:`MAX_FEATURES`)."""
  if rows < 1 or not 1 <= features <= MAX_FEATURES:
    return None
  if layout == "triton":
    width = pl.next_power_of_2(features)
    chunk = max(1, TRITON_CHUNK_ELEMENTS // width)
    steps = max(1, min(TRITON_MAX_STEPS, rows // (chunk * TRITON_MIN_PROGRAMS)))
    return Plan(layout, rows, features, width, chunk, steps, interpret)
  if layout == "mosaic":
    sublanes = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
    block = max(sublanes, MOSAIC_BLOCK_BYTES // (4 * features) // sublanes * sublanes)
    block = rows if rows <= block else min(block, 512)
    return Plan(layout, rows, features, features, block, 1, interpret)
  raise ValueError(f"layout={layout!r}; use 'triton' or 'mosaic'")


def _row_spec(plan: Plan, backward: bool, width: int) -> pl.BlockSpec:
  return pl.BlockSpec((plan.block_rows(backward), width), lambda i: (i, 0))


def call(kernel, plan: Plan, backward: bool, inputs: list[tuple[Array | None, str]],
          outputs: list[tuple[tuple[int, ...], Any, str]], name: str):
  """``pallas_call`` over row blocks; each input and output is ``(array, kind)`` with kind
  ``"rows"`` (rows, features), ``"vector"`` (1, features), ``"stat"`` (rows, 1) or
  ``"partial"`` (one (1, features) row per program). ``None`` inputs are left out."""
  specs = {
      "rows": _row_spec(plan, backward, plan.width),
      "stat": _row_spec(plan, backward, 1),
      "vector": pl.BlockSpec((1, plan.width), lambda i: (0, 0)),
      "partial": pl.BlockSpec((pl.squeezed, 1, plan.width), lambda i: (i, 0, 0)),
  }
  present = [(a, kind) for a, kind in inputs if a is not None]
  grid = plan.grid(backward)
  out_shape = [jax.ShapeDtypeStruct((grid, 1, plan.features) if kind == "partial" else shape,
                                    dtype) for shape, dtype, kind in outputs]
  options: dict[str, Any] = {}
  if plan.interpret:
    options["interpret"] = True
  elif plan.layout == "triton":
    elements = plan.chunk_rows * plan.width
    options["compiler_params"] = pltriton.CompilerParams(
        num_warps=min(16, max(4, elements // 1024)), num_stages=1)
  else:
    options["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel",))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,),
      in_specs=[specs[kind] for _, kind in present],
      out_specs=[specs[kind] for _, _, kind in outputs], name=name, **options,
  )(*(a for a, _ in present))


class Block:
  """Loads and stores of one chunk of rows, masked at the edges for Triton."""

  def __init__(self, plan: Plan, block_start, step):
    self.plan = plan
    self.start = step * plan.chunk_rows
    self.first_row = block_start + self.start

  # The masks are built where used, so that a kernel holds only the ones it needs.
  @functools.cached_property
  def row_valid(self) -> Array:
    rows = lax.broadcasted_iota(jnp.int32, (self.plan.chunk_rows, 1), 0)
    return self.first_row + rows < self.plan.rows

  @functools.cached_property
  def col_valid(self) -> Array:
    return lax.broadcasted_iota(jnp.int32, (1, self.plan.width), 1) < self.plan.features

  def _at(self, ref):
    return ref.at[pl.ds(self.start, self.plan.chunk_rows), :]

  def load(self, ref, kind: str = "rows") -> Array:
    """A chunk of a ``rows``/``stat`` input or the whole ``vector`` input, as float32."""
    ref = ref if kind == "vector" else self._at(ref)
    if self.plan.layout != "triton":
      return ref[...].astype(F32)
    mask = {"rows": self.row_valid & self.col_valid, "stat": self.row_valid,
            "vector": self.col_valid}[kind]
    return pltriton.load(ref, mask=mask, other=0).astype(F32)

  def store(self, ref, value: Array, kind: str = "rows") -> None:
    if kind != "partial":
      ref = self._at(ref)
    value = value.astype(ref.dtype)
    if self.plan.layout != "triton":
      ref[...] = value
      return
    mask = {"rows": self.row_valid & self.col_valid, "stat": self.row_valid,
            "partial": self.col_valid}[kind]
    pltriton.store(ref, value, mask=mask)

  def columns(self, value: Array) -> Array:
    """``value`` with the padding columns (Triton) set to 0."""
    return jnp.where(self.col_valid, value, 0) if self.plan.padded else value

  def column_sum(self, value: Array) -> Array:
    """Sum over this chunk's valid rows, shape (1, width) (the edge rows hold garbage)."""
    return jnp.sum(jnp.where(self.row_valid, value, 0), axis=0, keepdims=True)


def chunks(plan: Plan, backward: bool, body, carry):
  """Runs ``body(block, carry)`` over the chunks of one program's rows."""
  steps = plan.steps if backward else 1
  # The program id is read here, outside the loop (interpret mode only substitutes it there).
  block_start = pl.program_id(0) * plan.block_rows(backward)
  if steps == 1:
    return body(Block(plan, block_start, 0), carry)
  return lax.fori_loop(0, steps, lambda s, c: body(Block(plan, block_start, s), c), carry)


def row_mean(value: Array, n: int) -> Array:
  return jnp.sum(value, axis=1, keepdims=True) * (1.0 / n)
