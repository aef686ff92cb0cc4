"""`python -m jobs.cli ...`: how Ray Jobs entrypoints call the CLI."""
from jobs.cli import main

main()
