"""``python -m densevlm.cli`` (and ``accelerate launch -m densevlm.cli``)."""

import sys

from densevlm.cli.main import main

sys.exit(main())
