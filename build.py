#!/usr/bin/env python3
"""Entry point of the image factory: ./build.py IMAGE [--release X] [--skip-commit]."""

import sys

from osimage.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
