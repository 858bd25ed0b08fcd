"""The VM side of a build: one backend per site.yaml `backend:` (registry.py)."""
