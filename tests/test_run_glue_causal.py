"""examples/run_glue.py with a causal LM: the prompt + label-word path, end to end on a tiny Llama."""

import json
import sys
from pathlib import Path

import pytest
from test_prompting import TEMPLATE
from test_run_prompt_lm import tiny_lm_dir  # noqa: F401 (the fixture)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import _causal_lm  # noqa: E402
import run_glue  # noqa: E402


def glue_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(root / "model"),
        "--train_file", str(root / "train.csv"),
        "--validation_file", str(root / "validation.csv"),
        "--template", TEMPLATE,
        "--label_words", " negative", " positive",
        "--max_seq_length", "16",
        "--max_eval_samples", "64",
        "--per_device_train_batch_size", "16",
        "--output_dir", str(out),
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        "--logging_steps", "1000",
        "--trainable", "full",
        *extra,
    ]  # fmt: skip


def test_a_causal_lm_takes_the_label_word_path_federated(tiny_lm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    extra = ["--num_clients", "4", "--clients_per_round", "2", "--local_steps", "1", "--max_steps", "3"]
    run_glue.main(glue_args(tiny_lm_dir, out, *extra, "--zo_num_directions", "2"))
    results = json.loads((out / "prompt_lm_results.json").read_text())
    assert results["eval_examples"] == 64
    for tag in ("zero_shot", "trained"):
        assert 0.0 <= results[tag]["accuracy"] <= 1.0 and 0.0 <= results[tag]["macro_f1"] <= 1.0
    fed = results["federation"]
    assert fed["rounds"] == 3 and fed["num_clients"] == 4
    assert fed["bytes_uplink"] == 3 * 2 * (1 * 2) * 4  # rounds x clients x (tau * P) float32 scalars


def test_num_clients_zero_trains_centrally(tiny_lm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "central"
    run_glue.main(glue_args(tiny_lm_dir, out, "--num_clients", "0", "--max_steps", "1"))
    results = json.loads((out / "prompt_lm_results.json").read_text())
    assert results["federated"] is None and "federation" not in results


def test_detection_and_translation(tiny_lm_dir):  # noqa: F811
    assert _causal_lm.wants_label_words(["--model_name_or_path", str(tiny_lm_dir / "model")])
    assert _causal_lm.wants_label_words(["--objective=label_words"])
    assert not _causal_lm.wants_label_words(["--max_steps", "3"])  # the embedded encoder default
    argv = ["--task_name", "bbc_news", "--max_seq_length=32", "--objective", "label_words", "--num_clients", "0"]
    assert _causal_lm.glue_to_prompt_argv(argv) == ["--task", "bbc_news", "--max_length=32", "--num_clients", "0"]
    assert _causal_lm.glue_to_prompt_argv(["--objective", "soft_f1"]) == ["--objective", "soft_f1", "--federated"]


def test_bad_prompt_and_multi_token_label_words(tiny_lm_dir, tmp_path):  # noqa: F811
    bad = glue_args(tiny_lm_dir, tmp_path / "bad", "--max_steps", "1")
    bad[bad.index("--template") + 1] = "Review: . Sentiment:"
    with pytest.raises(ValueError, match="text slot"):
        run_glue.main(bad)
    multi = glue_args(tiny_lm_dir, tmp_path / "multi", "--max_steps", "1", "--num_clients", "0")
    multi[multi.index("--label_words") + 2] = " very positive"
    with pytest.raises(ValueError, match="single-token"):  # the class-score objectives refuse them
        run_glue.main([*multi, "--objective", "soft_error"])
    run_glue.main(multi)  # the label-word loss handles them (summed log-probabilities)
    results = json.loads((tmp_path / "multi" / "prompt_lm_results.json").read_text())
    assert len(results["label_word_tokens"][1]) == 2
