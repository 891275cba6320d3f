"""`python -m fedllm ...` is the `fedllm` command."""

import sys

from fedllm.cli import main

sys.exit(main())
