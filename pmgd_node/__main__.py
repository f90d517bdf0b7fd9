"""``python -m pmgd_node``: run one parameter-node process (same as ``pmgd node``)."""

import sys

from .process import main

sys.exit(main())
