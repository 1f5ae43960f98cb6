"""`python -m agentd` runs the same CLI as the `agentd` console script."""

import sys

from agentd.cli import main

sys.exit(main())
