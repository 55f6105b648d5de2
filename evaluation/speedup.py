"""Convergence speedup of a treatment run over a baseline run, from their TensorBoard logs (docs/method.md §4.2).

The command's code is ``lit_overtok.studies.speedup`` (so an installed copy runs studies too); its docstring has the options.
"""

from lit_overtok.errors import exit_on_user_error
from lit_overtok.studies.speedup import main

if __name__ == "__main__":
    exit_on_user_error(main)
