"""``python -m vialinspect.cli`` (and ``torchrun -m vialinspect.cli train ...``): the ``vialinspect`` command."""

import sys

from .app import main

sys.exit(main())
