import sys

from flowd.cli.main import main

sys.exit(main())
