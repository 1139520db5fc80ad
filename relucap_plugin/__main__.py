"""``python -m relucap_plugin``: the ``relucap`` command line (:func:`relucap_plugin.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
