"""The causal-LM examples (`examples/run_prompt_lm.py`, `examples/run_clm.py`) end to end on a tiny Llama."""

import json
import sys
from pathlib import Path

import pytest
from test_prompting import TEMPLATE, tiny_llama, tiny_tokenizer, toy_texts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_clm  # noqa: E402
import run_prompt_lm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A tiny Llama and its word-level tokenizer saved in Hugging Face layout, plus CSV splits of the toy task."""
    root = tmp_path_factory.mktemp("tiny_lm")
    tiny_llama().save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    toy_texts(256, seed=0).to_csv(root / "train.csv", index=False)
    toy_texts(128, seed=1).to_csv(root / "validation.csv", index=False)
    return root


def prompt_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"),
        "--train_file", str(root / "train.csv"),
        "--validation_file", str(root / "validation.csv"),
        "--template", TEMPLATE,
        "--label_words", " negative", " positive",
        "--max_length", "16",
        "--max_eval_samples", "100",
        "--per_device_train_batch_size", "32",
        "--output_dir", str(out),
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        "--logging_steps", "1000",
        *extra,
    ]  # fmt: skip


def test_prompt_example_trains_beyond_zero_shot(tiny_lm_dir, tmp_path):
    out = tmp_path / "out"
    args = ["--trainable", "full", "--learning_rate", "1e-2", "--zo_num_directions", "4", "--max_steps", "100"]
    results = run_prompt_lm.main(prompt_args(tiny_lm_dir, out, *args, "--zo_preconditioner", "False"))
    zero_shot, trained = results["zero_shot"], results["trained"]
    assert results["eval_examples"] == 100
    assert trained["majority_rate"] == 0.5  # the balanced evaluation subset
    assert zero_shot["accuracy"] < 0.7  # a random tiny model
    assert trained["accuracy"] > zero_shot["accuracy"] + 0.25, (zero_shot, trained)
    saved = json.loads((out / "prompt_lm_results.json").read_text())
    assert saved["trained"]["accuracy"] == trained["accuracy"]
    assert (out / "model.safetensors").exists()


def test_prompt_example_federated_lora_with_a_non_differentiable_objective(tiny_lm_dir, tmp_path):
    out = tmp_path / "fed"
    extra = [
        "--trainable", "lora", "--lora_target_modules", "q_proj", "v_proj",
        "--federated", "--num_clients", "4", "--clients_per_round", "2", "--local_steps", "2",
        "--objective", "soft_error", "--max_steps", "3", "--zo_num_directions", "2",
    ]  # fmt: skip
    results = run_prompt_lm.main(prompt_args(tiny_lm_dir, out, *extra))
    fed = results["federation"]
    assert fed["rounds"] == 3 and fed["num_clients"] == 4
    # Each sampled client uploads tau * P scalars per round.
    assert fed["bytes_uplink"] == 3 * 2 * (2 * 2) * 4
    assert results["trainable_parameters"] < 2000  # the adapter, not the model
    assert (out / "adapter_config.json").exists()


def test_prompt_example_multi_token_label_words_and_bad_input(tiny_lm_dir, tmp_path):
    args = prompt_args(tiny_lm_dir, tmp_path / "multi", "--max_steps", "2", "--trainable", "full")
    words = args.index("--label_words")
    args[words + 2] = " very positive"
    results = run_prompt_lm.main(args)
    assert results["label_word_tokens"][1] == [tiny_tokenizer().convert_tokens_to_ids(t) for t in ("very", "positive")]
    assert 0.0 <= results["trained"]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="single-token"):
        run_prompt_lm.main([*args, "--objective", "error"])
    bad = prompt_args(tiny_lm_dir, tmp_path / "bad", "--max_steps", "1")
    bad[bad.index("--template") + 1] = "Review: . Sentiment:"
    with pytest.raises(ValueError, match="text slot"):
        run_prompt_lm.main(bad)


def test_clm_example_lowers_perplexity(tiny_lm_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(toy_texts(300, seed=2)["text"]) + "\n")
    out = tmp_path / "clm"
    results = run_clm.main(
        [
            "--model_name_or_path", str(tiny_lm_dir / "model"),
            "--train_file", str(corpus),
            "--block_size", "16",
            "--trainable", "full",
            "--learning_rate", "1e-2",
            "--zo_num_directions", "4",
            "--zo_preconditioner", "False",
            "--max_steps", "100",
            "--per_device_train_batch_size", "16",
            "--output_dir", str(out),
            "--use_cpu", "True",
            "--disable_tqdm", "True",
        ]
    )  # fmt: skip
    assert results["after"]["perplexity"] < 0.8 * results["before"]["perplexity"], results
    assert (out / "clm_results.json").exists()
