"""``python -m pmgd_node``: run one parameter-node process (same as ``pmgd node``)."""

import sys

from .shell.process import main

sys.exit(main())
