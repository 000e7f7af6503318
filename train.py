"""Train a config: ``python train.py --config configs/quickstart.yaml [key=value ...]``.

Same as ``loopformer train ...``; running it again resumes the run from its latest checkpoint.
"""

import sys

from loopformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], process=True))
