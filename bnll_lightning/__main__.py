"""``python -m bnll_lightning``: the command line (:func:`bnll_lightning.cli.main`)."""

from bnll_lightning.cli import main

if __name__ == "__main__":
    main()
