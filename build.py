#!/usr/bin/env python3
"""Entry point of the image factory: ./build.py IMAGE [--release X] [--skip-commit]."""

import sys

if __name__ == "__main__":
    try:
        from osimage.cli import main
    except KeyboardInterrupt:  # a Ctrl-C while starting: no traceback either
        sys.exit(130)
    sys.exit(main(sys.argv[1:]))
