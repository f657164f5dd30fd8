"""One dispatch between the reference path and the backend fast paths.

The math lives in the reference modules (:mod:`jaxnorm._src.moments`,
:mod:`jaxnorm._src.normalize`, :mod:`jaxnorm._src.functional`): plain ``jnp``/``lax`` a reader
can follow top to bottom. A few operations there can be replaced by a faster implementation of
the same values, tuned for one backend (:mod:`jaxnorm._src.fast`). Each such operation has a
name; the reference module asks :func:`path` for the implementation to use, passing its own
as the default.

The paths in use are chosen by a mode, read when a function is traced:

- ``"xla"`` (the default): the tuned XLA paths, where one is registered; the reference
  elsewhere. Each is tested equal to the reference in values and gradients, and exists because
  ``benchmarks/speed.py`` shows it pays.
- ``"reference"``: the reference path everywhere, for debugging and for backends where no fast
  path was ever measured.
- ``"pallas"``: Pallas kernels where registered (layer and RMS norm over trailing axes, and
  the fused residual add + norm: :mod:`jaxnorm._src.fast.pallas`; Triton on GPU, Mosaic on TPU,
  interpret mode on CPU), then
  as ``"xla"``. Opt-in until ``benchmarks/accelerator.py`` shows the kernels paying on the
  hardware.

Set it with the environment variable ``JAXNORM_KERNELS`` (read at import) or the context
manager :func:`kernels`. A function already compiled under ``jax.jit`` keeps the paths it was
traced with: call :func:`jax.clear_caches` or trace anew after switching.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

MODES = ("xla", "reference", "pallas")
# What each mode tries, in order, before the reference.
_SEARCH = {"xla": ("xla",), "reference": (), "pallas": ("pallas", "xla")}

_registry: dict[str, dict[str, Callable]] = {}
_state = threading.local()


def _checked(mode: str, source: str) -> str:
  if mode not in MODES:
    raise ValueError(f"{source}={mode!r} is not a kernel mode; use one of {', '.join(MODES)} "
                     f"('reference' forces the reference path everywhere)")
  return mode


_DEFAULT = _checked(os.environ.get("JAXNORM_KERNELS", "xla").strip().lower() or "xla",
                    "JAXNORM_KERNELS")


def mode() -> str:
  """The kernel mode now in force: ``"xla"``, ``"reference"`` or ``"pallas"``."""
  return getattr(_state, "mode", _DEFAULT)


@contextlib.contextmanager
def kernels(name: str) -> Iterator[None]:
  """Traces the enclosed code with the paths of mode ``name`` (see this module's docstring).

  Example:
    >>> import jax.numpy as jnp, jaxnorm
    >>> with jaxnorm.kernels("reference"):
    ...   y = jaxnorm.layer_norm(jnp.array([[1.0, 3.0]]), epsilon=0.0)
    >>> y
    Array([[-1.,  1.]], dtype=float32)
  """
  _checked(name, "kernels")
  previous = mode()
  _state.mode = name
  try:
    yield
  finally:
    _state.mode = previous


def register(operation: str, backend: str, implementation: Callable) -> None:
  """Registers ``implementation`` as ``backend``'s path (``"xla"`` or ``"pallas"``) for
  ``operation``; it must take the reference's arguments and return its values."""
  _registry.setdefault(operation, {})[backend] = implementation


def path(operation: str, reference: Callable) -> Callable:
  """The implementation of ``operation`` under the current mode, else ``reference``."""
  registered = _registry.get(operation, {})
  for backend in _SEARCH[mode()]:
    if backend in registered:
      return registered[backend]
  return reference
