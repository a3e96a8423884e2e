"""The B / W / W+G / W+G+R / W+G+R+F ablation: `python eval/ablation.py [--config configs/demo.yaml] [--out DIR]`."""

import argparse
import sys

from regionmed_clip.ablation import run_ablation

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--out", default="outputs/ablation")
    args = parser.parse_args()
    run_ablation(args.config, args.out)
    sys.exit(0)
