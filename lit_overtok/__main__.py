"""``python -m lit_overtok fit ...``: the training CLI of ``train.py``, for installed copies of the package."""

from lit_overtok.cli.main import main

if __name__ == "__main__":
    main()
