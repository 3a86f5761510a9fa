import sys

from gkp_onnx.cli import main

sys.exit(main())
