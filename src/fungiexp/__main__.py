"""Allow `python -m fungiexp`, the same as the `fungiexp` command."""

import sys

from fungiexp.cli import main

sys.exit(main())
