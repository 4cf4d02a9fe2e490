"""`python -m pocketlm VERB` is `pocketlm VERB`."""
import sys

from pocketlm.cli import main

sys.exit(main())
