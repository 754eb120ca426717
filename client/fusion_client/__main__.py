"""`python -m fusion_client` runs the `fusion` CLI."""

import sys

from fusion_client.cli import main

sys.exit(main())
