"""`python -m leanvlm ...` works like the `leanvlm` command."""

from leanvlm.cli import main

main()
