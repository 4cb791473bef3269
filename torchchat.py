"""Entry point: python torchchat.py <command> ...  (see --help)."""

import sys

from torchchat.cli import main

if __name__ == "__main__":
    sys.exit(main())
