"""``python -m vialinspect``: the same as the ``vialinspect`` command."""

import sys

from .cli import main

sys.exit(main())
