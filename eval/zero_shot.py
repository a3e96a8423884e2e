"""zero-shot evaluation: `python eval/zero_shot.py --model M --data D --out DIR` (= regionmed-clip eval --tasks zero_shot)."""

import sys

from regionmed_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--tasks", "zero_shot", *sys.argv[1:]]))
