"""Test configuration: 8 host devices, so cross-device code runs for real on a CPU.

The flag must be set before JAX starts its backend, which is why it lives here.
"""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "jaxnorm", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile("jaxnorm")
