"""``python -m clipguard.cli`` (what ``torchrun`` runs)."""

import sys

from clipguard.cli.main import main

sys.exit(main())
