import sys

from vmtelemetryd.cli import main

sys.exit(main())
