"""drjobs from a checkout: `python run.py [COMMAND]`, the same as the installed `drjobs COMMAND`.

`python run.py --help` lists the commands; `python run.py COMMAND --help` describes one. The command line lives
in engine/cli.py.
"""

from __future__ import annotations

import sys

from engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
