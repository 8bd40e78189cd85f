"""``python -m detnet.controller`` is the ``detnet`` command."""

import sys

from detnet.controller.cli import main

sys.exit(main())
