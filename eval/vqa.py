"""vqa evaluation: `python eval/vqa.py --model M --data D --out DIR` (= regionmed-clip eval --tasks vqa)."""

import sys

from regionmed_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--tasks", "vqa", *sys.argv[1:]]))
