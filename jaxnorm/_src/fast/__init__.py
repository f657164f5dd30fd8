"""Backend fast paths, registered with :mod:`jaxnorm._src.dispatch` under the names of the
reference operations they replace: the XLA paths (``xla.py``) under ``"xla"``, the Pallas kernels
for GPU and TPU (``pallas.py``; kernels in ``pallas_rows.py``, the fused residual add + norm in
``pallas_add.py``) under ``"pallas"``."""
from jaxnorm._src import dispatch
from jaxnorm._src.fast import pallas
from jaxnorm._src.fast import xla

for _operation in ("moment_sums", "shift_and_scale", "normalize_rows", "rms_rows",
                   "add_normalize_rows", "add_rms_rows"):
  dispatch.register(_operation, "xla", getattr(xla, _operation))

for _operation in ("normalize_rows", "rms_rows", "add_normalize_rows", "add_rms_rows"):
  dispatch.register(_operation, "pallas", getattr(pallas, _operation))
