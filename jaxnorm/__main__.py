"""``python -m jaxnorm stats PATH...``: see :mod:`jaxnorm._src.cli`."""
from jaxnorm._src.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
