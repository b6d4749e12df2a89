"""`python -m minirlhf` runs the command line."""

from minirlhf.cli import main

main()
