"""`python -m perlhf.label ...`: the label commands without the rest of the perlhf CLI."""

import sys

from perlhf.label.cli import main

sys.exit(main())
