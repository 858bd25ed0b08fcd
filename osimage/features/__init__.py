"""Capabilities of a build, one module each, listed once in registry.py (the protocol:
osimage/build/feature.py)."""
