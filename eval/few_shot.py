"""few-shot evaluation: `python eval/few_shot.py --model M --data D --out DIR` (= regionmed-clip eval --tasks few_shot)."""

import sys

from regionmed_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--tasks", "few_shot", *sys.argv[1:]]))
