"""Strict JSON files: written with Python's shortest exact float repr, read without NaN or pickle.

The one reader and writer of :func:`jaxnorm.save_stats` files (statistics and accumulators).
"""
from __future__ import annotations

import json
import os
from typing import Any


def _reject_constant(name: str):
  raise ValueError(f"holds {name}, which is not a number; every statistic must be finite")


def write(data: dict[str, Any], path: str | os.PathLike) -> None:
  """Writes ``data`` as indented JSON (finite numbers only)."""
  text = json.dumps(data, indent=2, allow_nan=False)
  with open(path, "w", encoding="utf-8") as file:
    file.write(text + "\n")


def read(path: str | os.PathLike) -> Any:
  """The JSON value in ``path``; ValueError (naming the file) if it is not strict UTF-8 JSON.

  Raises:
    OSError: the file cannot be read.
  """
  source = os.fspath(path)
  with open(path, "rb") as file:
    raw = file.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    raise ValueError(f"{source}: not a UTF-8 text file; give a JSON file written by "
                     f"jaxnorm.save_stats") from None
  try:
    return json.loads(text, parse_constant=_reject_constant)
  except json.JSONDecodeError as error:
    raise ValueError(f"{source}: not valid JSON ({error.msg} at line {error.lineno}, column "
                     f"{error.colno}); give a file written by jaxnorm.save_stats") from None
  except ValueError as error:
    raise ValueError(f"{source}: {error}") from None
