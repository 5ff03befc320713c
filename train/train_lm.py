"""Train a TRM (or a sized Llama baseline) as a causal language model on TinyStories-like text.

    python train/train_lm.py --config train/configs/tinystories-small.yaml
    accelerate launch --multi_gpu --num_processes 8 train/train_lm.py --config train/configs/tinystories-small.yaml
    python train/train_lm.py --config train/configs/llama-flops.yaml          # the FLOP-matched baseline
    python train/train_lm.py --config ... --resume_from_checkpoint latest      # continue an interrupted run

Runs trm_lm.text_task.main: every flag of trm_lm.training.TrainingArguments plus that module's data and
model flags; values from `--config` are overridden by flags given on the command line. Without
--tokenizer_name a byte-level BPE of --vocab_size is trained on the training texts and saved with the model.
Evaluation reports bits per byte, per-token loss and perplexity of the validation documents
(trm_lm.evaluate), computed with the EMA weights when --ema_decay > 0. TRM_LM_SMOKE=1 in the environment makes any of these a smoke run
(2 optimizer steps of 2 blocks, 2 evaluation and report documents) that only checks the command works.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trm_lm.generation import one_line  # noqa: E402
from trm_lm.text_task import main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FloatingPointError) as error:  # user errors: one line, no traceback
        sys.exit(f"error: {one_line(error)}")
