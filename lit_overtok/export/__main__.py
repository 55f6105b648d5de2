"""``python -m lit_overtok.export``: see ``lit_overtok.export.command``."""

from lit_overtok.export.command import run

if __name__ == "__main__":
    run()
