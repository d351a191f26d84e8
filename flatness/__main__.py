"""``python -m flatness``: the same entry point as the ``flatness`` console script
(and what ``torchrun --nproc_per_node 2 -m flatness train ...`` runs)."""

from flatness.cli.main import entry

if __name__ == "__main__":
    entry()
