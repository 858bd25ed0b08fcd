"""The records: each image's manifest.json and the release manifest (manifests/manifest.yaml),
with the release, tidy and set-patches commands."""
