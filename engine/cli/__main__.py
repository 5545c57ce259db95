"""`python -m engine.cli` = the `qrelay` command (tests and benchmarks use it)."""
from engine.cli import main

main()
