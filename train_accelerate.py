"""Train RegionMed-CLIP: `accelerate launch train_accelerate.py --config configs/demo.yaml [--resume]`."""

import sys

from regionmed_clip.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
