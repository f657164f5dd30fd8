"""Backend fast paths, registered with :mod:`jaxnorm._src.dispatch` under the names of the
reference operations they replace. Pallas kernels for GPU and TPU go beside ``xla.py``, each
registered under ``"pallas"``."""
from jaxnorm._src import dispatch
from jaxnorm._src.fast import xla

for _operation in ("moment_sums", "shift_and_scale", "normalize_rows", "rms_rows"):
  dispatch.register(_operation, "xla", getattr(xla, _operation))
