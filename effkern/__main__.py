"""`python -m effkern` is the `effkern` command."""

from effkern.cli import main

main()
