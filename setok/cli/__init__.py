"""The `setok` command line (click). `setok.cli:main` is the console entry point."""

from setok.cli.main import main

__all__ = ["main"]
