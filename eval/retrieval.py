"""retrieval evaluation: `python eval/retrieval.py --model M --data D --out DIR` (= regionmed-clip eval --tasks retrieval)."""

import sys

from regionmed_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", "--tasks", "retrieval", *sys.argv[1:]]))
