"""The text task: causal language modelling on TinyStories-like documents, for the one training loop.

`main(argv)` is `train/train_lm.py`: every flag of trm_lm.training.TrainingArguments plus `DataArguments` and
`ModelArguments` below. The texts are read once; the training split is tokenized and packed into
`block_size` blocks, the validation documents are scored whole, in bits per byte (trm_lm.evaluate), with the
EMA weights when --ema_decay > 0. Its grid counterpart is puzzles/train_task.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaForCausalLM

from .baselines import llama_config_from_trm, trm_config_from_flags
from .data import expand_data_files, load_or_train_tokenizer, load_text_datasets, pack_dataset, read_documents
from .evaluate import bits_per_byte
from .model_card import TRM_PAPER, render_model_card
from .modeling_trm import TRMForCausalLM
from .arguments import TrainingArguments, parse_args
from .training import TrainingTask, init_weights_from, process_state, run_training


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id; default roneneldan/TinyStories when no --train_file."})
    dataset_config_name: str | None = None
    train_file: list[str] | None = field(
        default=None, metadata={"help": ".txt / .jsonl / .json / .parquet documents: one or more files or globs."})
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Documents evaluated during training (model selection). Default: "
                                        "--validation_split_percentage %% of the training documents, held out."})
    report_file: list[str] | None = field(
        default=None, metadata={"help": "Test sets scored once with the final model (bits/byte in results.json "
                                        "and the model card); never used for selection."})
    max_report_documents: int | None = field(
        default=None, metadata={"help": "Score the first N documents of each --report_file (default: all)."})
    text_column: str = "text"
    streaming: bool = False
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of the training documents held out when there is no validation data."})
    block_size: int = field(default=512, metadata={"help": "Tokens per packed training block (the context)."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub id; default: train a byte-level BPE."})
    vocab_size: int = field(
        default=4096, metadata={"help": "Vocabulary of the BPE trained when no tokenizer is given."})
    max_eval_documents: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N validation documents (default: all)."})
    preprocessing_num_workers: int | None = None


@dataclass
class ModelArguments:
    """Architecture flags; unset (None) means TRMConfig's default. A llama baseline is sized from them."""

    model_type: Literal["trm", "llama"] = "trm"
    baseline_match: Literal["params", "flops"] = field(
        default="params", metadata={"help": "llama only: same parameter count, or same forward FLOPs per token."})
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    net_layers: int | None = None
    latent_steps: int | None = field(default=None, metadata={"help": "n: latent updates per cycle."})
    cycles: int | None = field(default=None, metadata={"help": "T: cycles per supervision step (T-1 without grad)."})
    supervision_steps: int | None = field(default=None, metadata={"help": "N_sup: deep-supervision steps."})
    halt_loss_weight: float | None = None
    backprop_all_cycles: bool | None = field(
        default=None, metadata={"help": "Gradient through all T cycles, not only the last (an ablation)."})
    norm_position: Literal["post", "pre"] | None = None
    input_injection: Literal["add", "concat"] | None = None
    position_encoding: Literal["rope", "learned", "none"] | None = None
    rope_theta: float | None = None
    embedding_dropout: float | None = None
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Default: --block_size."})
    step_context: Literal["every_step", "first_step"] | None = field(
        default=None, metadata={"help": "What later supervision steps attend to of earlier tokens: the same step "
                                        "(every_step, official) or their first step (first_step: a KV cache of "
                                        "one step, N_sup times smaller, still exact)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "TRM folder to start from (its weights; give its tokenizer with --tokenizer_name). The "
                          "network is shared by every step, so the schedule (supervision_steps, cycles, "
                          "latent_steps) may differ from the one it was trained with; the shapes may not."})


# TRM_LM_SMOKE=1 (trm_lm.arguments.smoke_run): besides the step counts, score only a few documents.
SMOKE_DOCUMENT_LIMITS = {"max_eval_documents": 2, "max_report_documents": 2}


class CausalLMTask(TrainingTask):
    """Packed blocks in, next-token loss out; evaluation = bits per byte on whole validation documents."""

    def __init__(self, data_args: DataArguments, model_args: ModelArguments, tokenizer, train_dataset,
                 eval_documents: list[str], eval_batch_size: int):
        self.data_args, self.model_args, self.tokenizer = data_args, model_args, tokenizer
        self.train_dataset, self.eval_documents, self.eval_batch_size = train_dataset, eval_documents, eval_batch_size

    def build_model(self):
        args, tokenizer = self.model_args, self.tokenizer
        trm_config = trm_config_from_flags(
            asdict(args), vocab_size=len(tokenizer),
            max_position_embeddings=args.max_position_embeddings or self.data_args.block_size,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        if args.model_type == "trm":
            model = TRMForCausalLM(trm_config)
            return init_weights_from(model, args.init_from) if args.init_from else model
        if args.init_from:
            raise ValueError("--init_from starts a TRM from a trained TRM; it does not apply to --model_type llama")
        return LlamaForCausalLM(llama_config_from_trm(trm_config, args.baseline_match))

    def evaluate(self, model, accelerator):
        # Each process scores its share of the documents; the sums are combined, so the numbers equal a
        # single-process evaluation of all of them.
        documents = self.eval_documents[accelerator.process_index :: accelerator.num_processes]
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # nll (nats), tokens, bytes
        if documents:
            result = bits_per_byte(model, self.tokenizer, documents, context_length=self.data_args.block_size,
                                   batch_size=self.eval_batch_size)
            totals += torch.tensor([result["nll_nats"], result["tokens"], result["bytes"]], dtype=torch.float64,
                                   device=accelerator.device)
        nll, tokens, num_bytes = accelerator.reduce(totals, reduction="sum").tolist()
        loss = nll / tokens
        return {"bits_per_byte": nll / (math.log(2) * num_bytes), "loss": loss, "perplexity": math.exp(loss)}

    def score_report_files(self, model) -> dict[str, float]:
        """Bits/byte of the final model on each --report_file (fp32, whole documents), keyed by file stem."""
        scores = {}
        if not self.data_args.report_file:
            return scores
        for path in expand_data_files(self.data_args.report_file):
            documents = read_documents(path)[: self.data_args.max_report_documents]
            with torch.no_grad():
                result = bits_per_byte(model.eval(), self.tokenizer, documents, progress=True,
                                       context_length=self.data_args.block_size, batch_size=self.eval_batch_size)
            print(f"{path}: {result['bits_per_byte']:.4f} bits/byte on {len(documents)} documents", flush=True)
            scores[f"{path.stem}_bits_per_byte"] = result["bits_per_byte"]
            scores[f"{path.stem}_documents"] = len(documents)
        return scores

    def save_final(self, model, output_dir, metrics, run_info):
        self.tokenizer.save_pretrained(output_dir)
        data, trm = self.data_args, self.model_args.model_type == "trm"
        # Test-set scores join the final metrics (results.json is written from the same dict after this).
        metrics.update(self.score_report_files(model))
        if data.train_file:
            names = lambda spec: ", ".join(p.name for p in expand_data_files(spec))  # noqa: E731
            source = f"local files (train: {names(data.train_file)}" + (
                f"; validation: {names(data.validation_file)})" if data.validation_file else
                f"; {data.validation_split_percentage:g}% of them held out for validation)")
        else:
            source = f"{data.dataset_name or 'roneneldan/TinyStories'} (Hub)"
        tokenizer = data.tokenizer_name or f"byte-level BPE of {len(self.tokenizer)} tokens trained on the train split"
        kind = TRM_PAPER if trm else f"Llama baseline, {self.model_args.baseline_match}-matched to a TRM,"
        card = render_model_card(
            model_name=output_dir.name, metrics={f"validation_{k}": v for k, v in metrics.items()}, run_info=run_info,
            description=f"A {kind} causal language model trained with trm-lm on {source}. Metrics: bits per byte, "
                        f"per-token loss and perplexity of {len(self.eval_documents)} whole validation documents "
                        "(trm_lm.evaluate).",
            datasets=[data.dataset_name] if data.dataset_name else None,
            data_description=f"{source}; {data.block_size}-token packed blocks; tokenizer: {tokenizer}",
            custom_code=trm, tags=["tinystories"],
        )
        card.save(output_dir / "README.md")


def main(argv: list[str] | None = None):
    training_args, data_args, model_args = parse_args([TrainingArguments, DataArguments, ModelArguments], argv,
                                                      smoke_limits=SMOKE_DOCUMENT_LIMITS)
    training_args.validate()
    output_dir = Path(training_args.output_dir)
    load_kwargs = dict(dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
                       train_file=data_args.train_file, validation_file=data_args.validation_file,
                       text_column=data_args.text_column, streaming=data_args.streaming,
                       validation_split_percentage=data_args.validation_split_percentage, seed=training_args.seed)

    state = process_state(training_args)
    with state.main_process_first():  # the main process trains/caches first; the others then read its files
        raw = load_text_datasets(**load_kwargs)
        saved_tokenizer = output_dir / "tokenizer"  # a trained tokenizer is saved here at once
        resuming = training_args.resume_from_checkpoint and (saved_tokenizer / "tokenizer.json").is_file()
        if data_args.tokenizer_name is None and (resuming or not state.is_main_process):
            tokenizer = load_or_train_tokenizer(saved_tokenizer)  # the first run's / the main process's tokenizer
        else:
            tokenizer = load_or_train_tokenizer(
                data_args.tokenizer_name, train_texts=(row["text"] for row in raw["train"]),
                vocab_size=data_args.vocab_size,
                output_dir=saved_tokenizer if data_args.tokenizer_name is None else None)
        train_dataset = pack_dataset(raw["train"], tokenizer, data_args.block_size,
                                     data_args.preprocessing_num_workers).with_format("torch")
        eval_documents = [row["text"] for row in itertools.islice(raw["validation"], data_args.max_eval_documents)]

    task = CausalLMTask(data_args, model_args, tokenizer, train_dataset, eval_documents,
                        training_args.per_device_eval_batch_size)
    return run_training(training_args, task)


__all__ = ["DataArguments", "ModelArguments", "CausalLMTask", "main"]
