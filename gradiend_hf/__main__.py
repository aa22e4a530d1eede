"""`python -m gradiend_hf ...` is the `gradiend-hf` command."""

import sys

from .app.cli import main

sys.exit(main())
