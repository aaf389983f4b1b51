"""``python -m engine``: the command line."""

import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C while numpy and friends load: no traceback
    print("engine: error: interrupted by SIGINT while starting", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
