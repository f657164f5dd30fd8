"""jaxnorm's implementation. Import from ``jaxnorm``, ``jaxnorm.linen`` and ``jaxnorm.nnx``."""
