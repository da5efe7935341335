"""``python -m bnll_lightning``: the command line (:func:`bnll_lightning.cli.main`)."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["study"] and {"-h", "--help"} & set(sys.argv[2:]):
        # study --help without importing torch and Lightning (seconds): its options live in study_args.
        from bnll_lightning.study_args import study_help

        print(study_help(), end="", flush=True)
    else:
        from bnll_lightning.cli import main

        main()
