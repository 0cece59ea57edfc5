"""`python -m sandbox --port 8081 [--latency-ms 50 --error-rate 0.1 …]`: the local Digital River alone."""

import sys

from sandbox.server import main

sys.exit(main())
