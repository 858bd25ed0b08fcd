"""osimage: the image factory of the cluster's release team."""

__version__ = "0.1.0"
