"""Score checkpoints on lm-eval tasks: one checkpoint or a glob of them, offline by default.

The command's code is ``lit_overtok.evaluation.score_checkpoints`` (so an installed copy scores too); its docstring has
the options.
"""

from lit_overtok.evaluation.score_checkpoints import run

if __name__ == "__main__":
    run()
