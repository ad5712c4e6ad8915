"""``python -m kdlab`` (used by ``accelerate launch -m kdlab ...``)."""

import sys

from kdlab.cli import main

sys.exit(main())
