"""``python -m sumcircuit.cli`` (what ``accelerate launch -m sumcircuit.cli`` runs)."""

import sys

from sumcircuit.cli import main

sys.exit(main())
