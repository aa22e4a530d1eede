"""`python -m gradiend_hf ...` is the `gradiend-hf` command."""

import sys

from .cli import main

sys.exit(main())
