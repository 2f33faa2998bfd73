"""Entry point for ``python -m sitebackup``."""

from sitebackup.cli import main

main()
