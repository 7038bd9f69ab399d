"""The real-Envoy and end-to-end tests take their fixtures from the harness package."""

from sa_harness.fixtures import full_stack, stack  # noqa: F401  (fixtures)
