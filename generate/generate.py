"""Generate stories with a trained TRM (or any causal LM) from the command line.

    python generate/generate.py --prompt "Once upon a time"                       # the default model
    python generate/generate.py --model user/trm-tinystories --prompt "Tom saw" --stream --seed 0
    echo "Lily found a shell." | python generate/generate.py --prompt - --show_steps --halt_threshold 0.9

--show_steps prints, after the text, a table of every generated token: how many supervision steps it
ran (fewer than the model's when it exited early, see --halt_threshold) and the top predictions after
each step. Errors are one line on stderr and exit code 2.
"""

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # runs from a checkout without `pip install -e .`

from transformers.utils import logging as hf_logging  # noqa: E402

from trm_lm.cli import HelpFormatter  # noqa: E402
from trm_lm.generation import (  # noqa: E402
    GenerationSettings,
    context_length,
    default_model_path,
    encode_prompt,
    generate_text,
    load_model_and_tokenizer,
    one_line,
    stream_generate,
    validate_prompt,
)
from trm_lm.inspection import format_trace_table  # noqa: E402

DEFAULTS = GenerationSettings()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model folder or Hugging Face Hub id (default: checkpoints/trm-tinystories-small)")
    parser.add_argument("--prompt", required=True, help="text to continue; '-' reads it from stdin")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULTS.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=DEFAULTS.top_k, help="top-k sampling, 0 = off")
    parser.add_argument("--top_p", type=float, default=DEFAULTS.top_p, help="nucleus sampling, 1 = off")
    parser.add_argument("--repetition_penalty", type=float, default=DEFAULTS.repetition_penalty, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--num_return_sequences", type=int, default=DEFAULTS.num_return_sequences)
    parser.add_argument("--halt_threshold", type=float, default=None,
                        help="TRM per-token early exit: a token stops once P(halt) >= this; 0 = off "
                             "(default: the model's config)")
    parser.add_argument("--supervision_steps", type=int, default=None,
                        help="TRM: run only the first k supervision steps per token (default: all)")
    parser.add_argument("--share_step_cache", action="store_true",
                        help="TRM: the supervision steps share one step's KV cache slots: KV memory / N_sup, "
                             "not exact (benchmarks/results/kv_cache.md has its cost)")
    parser.add_argument("--compile", action="store_true",
                        help="TRM: decode with one torch.compile'd step on a static cache (compiles for 10-20 s "
                             "first; pays off on long generations; needs --halt_threshold 0 when the model's "
                             "config sets one; benchmarks/results/decode.md has its speed)")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--show_steps", action="store_true",
                        help="TRM: after the text, print the steps each token used and the top predictions per step")
    parser.add_argument("--show_top_k", type=int, default=3, help="predictions per step shown by --show_steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="allow a Hub model's own code to run (not needed for TRM models: trm_lm is installed)")
    return parser.parse_args(argv)


def read_prompt(value: str) -> str:
    if value != "-":
        return validate_prompt(value)
    raw = sys.stdin.buffer.read()
    if raw.endswith(b"\n"):  # the newline `echo` adds is not part of the story
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    return validate_prompt(raw)


def run(args: argparse.Namespace) -> None:
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_return_sequences=args.num_return_sequences,
        halt_threshold=args.halt_threshold, supervision_steps=args.supervision_steps,
        share_step_cache=args.share_step_cache, seed=args.seed, compile=args.compile,
    )
    if args.show_steps and settings.num_return_sequences != 1:
        raise ValueError("--show_steps follows one sequence: use --num_return_sequences 1")
    if args.show_steps and args.show_top_k < 1:
        raise ValueError(f"--show_top_k must be >= 1, got {args.show_top_k}")
    prompt = read_prompt(args.prompt)
    if args.model is not None and not args.model.strip():
        raise ValueError("--model is empty: give a model folder or Hub id, or leave --model out for the shipped model")
    model, tokenizer = load_model_and_tokenizer(args.model or default_model_path(REPO_ROOT), device=args.device,
                                                trust_remote_code=args.trust_remote_code)
    encoded = encode_prompt(tokenizer, prompt, settings.max_new_tokens, context_length(model))
    if encoded.warning:
        print(f"warning: {encoded.warning}", file=sys.stderr)

    traces = None
    if args.stream:
        stream = stream_generate(model, tokenizer, encoded, settings,
                                 trace_top_k=args.show_top_k if args.show_steps else 0)
        print(prompt, end="", flush=True)
        while True:
            try:
                print(next(stream), end="", flush=True)
            except StopIteration as finished:
                result = finished.value
                break
        print()
        traces = result.traces
    elif args.show_steps:
        result = generate_text(model, tokenizer, encoded, settings, trace_top_k=args.show_top_k)
        traces = result.traces
        print(prompt + result.text)
    else:
        texts = generate_text(model, tokenizer, encoded, settings).texts
        for index, text in enumerate(texts):
            if len(texts) > 1:
                print(f"--- sample {index + 1} of {len(texts)} ---")
            print(prompt + text)
    if traces is not None:
        print()
        print(format_trace_table(traces))


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()  # no loading chatter between the story and the user
    hf_logging.disable_progress_bar()
    try:
        run(args)
    except (ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
