"""`python -m setok.cli ...` runs the command line (tests and torchrun use it)."""

from setok.cli.main import main

if __name__ == "__main__":
    main()
