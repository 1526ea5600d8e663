"""``python -m pretrain --config RUN.yaml [--set key=value ...]``: see pretrain/train.py."""

import sys

from pretrain.train import main

sys.exit(main())
