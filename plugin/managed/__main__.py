"""`python -m plugin.managed`: print the managed plugin's config.json."""

import sys

from plugin.managed import main

sys.exit(main())
