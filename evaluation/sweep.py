"""Run a study: a grid of ``train.py fit`` runs (arms x seeds) from a YAML file, resumable, in parallel or on SLURM.

The command's code is ``lit_overtok.studies.sweep`` (so an installed copy runs studies too); its docstring has the options.
"""

import sys

from lit_overtok.errors import exit_on_user_error
from lit_overtok.studies.sweep import main

if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
