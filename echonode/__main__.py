import sys

from echonode.cli import main

sys.exit(main())
