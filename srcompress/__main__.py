import sys

from srcompress.cli import main

sys.exit(main())
