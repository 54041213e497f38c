"""Kernels, launchers and registered ops. ``reference`` is the spec and the test oracle."""
