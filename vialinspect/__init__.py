"""vialinspect: automated visual inspection of injectable containers.

The packages ``datasets``, ``vision``, ``training``, ``export`` and ``inspection_station`` hold the work;
this package holds the one command line, ``vialinspect``, and the demo.
"""

import os

__version__ = "0.1.0"

# Nothing this program does needs the internet: stop libraries from phoning home.
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)
