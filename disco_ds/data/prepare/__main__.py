"""``python -m disco_ds.data.prepare ...``: the same as ``disco_ds prepare ...``."""

import argparse
import sys

from disco_ds.data import prepare

_parser = argparse.ArgumentParser(prog="disco_ds prepare", description=prepare.__doc__.split("\n\n")[0])
prepare.add_arguments(_parser)
sys.exit(prepare.main(_parser.parse_args()))
