"""`python -m cogvlm.finetune ARGS`: the same as `cogvlm finetune ARGS`."""
import sys

from ..cli import main

sys.exit(main(["finetune", *sys.argv[1:]]))
