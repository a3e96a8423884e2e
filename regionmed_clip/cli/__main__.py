"""`python -m regionmed_clip.cli`, the same as the `regionmed-clip` console script."""

import sys

from . import main

sys.exit(main())
