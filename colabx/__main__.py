"""``python -m colabx``: the ``colabx`` command line (used by ``torchrun -m colabx train``)."""

import sys

from colabx.cli import main

sys.exit(main())
