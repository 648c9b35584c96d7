"""LoRA fine-tuning of a trained base DiffiT: `accelerate launch scripts/train_lora.py [flags]` or `python scripts/train_lora.py`.

See `--help` and README.md; `--list-runs` compares runs, `--resume [N]` continues one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(kind="lora"))
