"""vialinspect: automated visual inspection of injectable containers.

One namespace: ``vialinspect.datasets`` (simulator, dataset format), ``vialinspect.vision`` (network,
preprocessing, ONNX Runtime), ``vialinspect.training``, ``vialinspect.export`` (packages, registry) and
``vialinspect.inspection_station`` (station, record store, QA review). This package itself holds the one
command line, ``vialinspect``, and the demo. Importing it changes nothing in the process's environment.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vialinspect")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# Nothing this program does needs the internet: the CLI sets these (unless the user set them) so that
# libraries do not phone home. Set in ``cli.main()``, not on import: a library import must not change the
# environment of the program that imports it.
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


def set_offline_env() -> None:
    """Stop the libraries vialinspect uses from phoning home (each variable only where the user left it unset).

    Called by the command line's ``main()`` and by the benchmark scripts before they import those libraries.
    """
    import os

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
