"""``python -m flatness.cli``: same as ``python -m flatness``."""

from flatness.cli.main import entry

if __name__ == "__main__":
    entry()
