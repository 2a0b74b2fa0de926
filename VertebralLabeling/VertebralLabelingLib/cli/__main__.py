"""``python -m VertebralLabelingLib.cli``."""

import sys

from .main import main

sys.exit(main())
