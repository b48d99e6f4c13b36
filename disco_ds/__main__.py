"""``python -m disco_ds`` (also what ``deepspeed --module disco_ds`` runs on every rank)."""

import sys

from disco_ds.cli import main

sys.exit(main())
