"""`python -m vitune ...` (also what `torchrun -m vitune` runs): the `vitune` command."""

import sys

from vitune.cli import main

if __name__ == "__main__":
    sys.exit(main())
