"""`python -m cnnscope.cli` runs the command line."""

from . import main

main()
