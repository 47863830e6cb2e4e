"""``python -m cpkp`` runs the command line (also what ``torchrun -m cpkp`` starts)."""

import sys

from cpkp.cli import main

sys.exit(main())
