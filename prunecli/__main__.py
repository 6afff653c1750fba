"""`python -m prunecli` entry point."""

from prunecli.cli import main

main()
