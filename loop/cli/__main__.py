"""`python -m loop.cli`: the `isara` command."""

from loop.cli import main

main()
