"""The report of a sweep (evaluation/sweep.py): markdown, JSON and PNG figures from its TensorBoard logs and checkpoints.

The command's code is ``lit_overtok.studies.report`` (so an installed copy runs studies too); its docstring has the options.
"""

import sys

from lit_overtok.errors import exit_on_user_error
from lit_overtok.studies.report import main

if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
