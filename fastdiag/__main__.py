"""``python -m fastdiag ...`` runs the ``fastdiag`` command (see ``fastdiag.cli``)."""

import sys

from fastdiag.cli import main

sys.exit(main())
