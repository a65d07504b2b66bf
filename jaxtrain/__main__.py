"""``python -m jaxtrain``: the ``jaxtrain`` command line (`jaxtrain.apps.cli`).

An entry point, not part of the core: ``import jaxtrain`` never runs this module, so the
core still never imports `jaxtrain.apps`.
"""

import sys

from jaxtrain.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
