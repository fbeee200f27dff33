"""Model cards: front matter and figures against the ledger, cards on save and checkpoints, no token and no absolute
path in anything written, and the rendered examples in `model_cards/` in step with the shipped template."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from huggingface_hub import ModelCard

from hf_hiso import FederatedZOCallback, HiSoTrainer
from hf_hiso.metrics import build_compute_metrics
from hf_hiso.model_card import (
    CARD_INPUTS_NAME,
    HubToken,
    format_bytes,
    model_card_inputs,
    public_model_name,
    render_model_card,
    template_path,
)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_TestTokenThatMustNeverBeWritten0123"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model(model=None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=1, target_modules=["query", "value"])
    return get_peft_model(model if model is not None else tiny_bert(), config)


def make_trainer(tmp_path, model, federated: bool, **overrides) -> HiSoTrainer:
    callbacks = [FederatedZOCallback(num_clients=3, clients_per_round=2, seed=0)] if federated else []
    return HiSoTrainer(
        model=model,
        args=hiso_args(tmp_path, **overrides),
        train_dataset=toy_dataset(48),
        eval_dataset=toy_dataset(16, seed=1),
        compute_metrics=build_compute_metrics(None, num_labels=2, backend="scikit-learn"),
        callbacks=callbacks,
    )


def federated_callback(trainer) -> FederatedZOCallback:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FederatedZOCallback))


def written_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def test_federated_peft_card_front_matter_and_figures(tmp_path):
    trainer = make_trainer(tmp_path, lora_model(), federated=True)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.create_model_card(
        finetuned_from="org/tiny-bert",
        dataset_tags="toy-tokens",
        dataset="toy tokens",
        tasks="text-classification",
        baseline_metrics=before,
    )
    out = Path(trainer.args.output_dir)
    card = ModelCard.load(out / "README.md")
    text = card.text

    # Front matter.
    data = card.data
    assert data.base_model == "org/tiny-bert"
    assert data.library_name == "peft"
    assert data.datasets == ["toy-tokens"]
    assert data.pipeline_tag == "text-classification"
    assert {"hf_hiso", "zeroth-order", "federated-learning", "peft"} <= set(data.tags)
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results["accuracy"] == pytest.approx(after["eval_accuracy"], abs=1e-6)
    assert results["f1"] == pytest.approx(after["eval_f1"], abs=1e-6)
    assert all(r.dataset_type == "toy-tokens" and r.task_type == "text-classification" for r in data.eval_results)

    # Communication figures are the ledger's.
    ledger = federated_callback(trainer).ledger
    summary = ledger.summary()
    assert summary["rounds"] == trainer.state.global_step == 4
    for key in ("bytes_uplink", "bytes_downlink", "bytes_total", "fedavg_bytes", "paper_bytes"):
        assert format_bytes(summary[key]) in text, key
    assert f"{ledger.saving_factor:,.0f}x" in text
    assert f"| rounds run | {summary['rounds']} |" in text
    assert "| clients M | 3 |" in text and "| clients sampled per round m | 2 |" in text

    # Settings, usage, metrics before and after, versions, citation.
    zo = trainer.zo_args
    assert f"| perturbation radius mu (`zo_eps`) | {zo.zo_eps:.4g} |" in text
    assert f"| directions per step P (`zo_num_directions`) | {zo.zo_num_directions} |" in text
    assert 'PeftModel.from_pretrained(base, "out")' in text
    assert 'from_pretrained("org/tiny-bert", num_labels=2)' in text
    assert f"| accuracy | {before['eval_accuracy']:.4g} | {after['eval_accuracy']:.4g} |" in text
    import transformers

    assert f"- transformers {transformers.__version__}" in text
    assert "Converge Faster, Talk Less: Hessian-Informed Federated Zeroth-Order Optimization" in text
    assert "ICLR" in text

    # The stored inputs re-render to exactly this card.
    inputs = json.loads((out / CARD_INPUTS_NAME).read_text())
    assert str(render_model_card(inputs)) == (out / "README.md").read_text()


def test_centralized_full_model_card(tmp_path):
    trainer = make_trainer(tmp_path, tiny_bert(), federated=False, max_steps=2)
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    card = ModelCard.load(Path(trainer.args.output_dir) / "README.md")
    assert card.data.library_name == "transformers"
    assert "federated-learning" not in card.data.tags and "peft" not in card.data.tags
    assert {"hf_hiso", "zeroth-order"} <= set(card.data.tags)
    assert "Trained centrally (one process)" in card.text
    assert "PeftModel" not in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("out")' in card.text


def test_cards_on_checkpoints_follow_the_ledger(tmp_path):
    trainer = make_trainer(tmp_path, lora_model(), federated=True, save_strategy="steps", save_steps=2)
    trainer.train()
    out = Path(trainer.args.output_dir)
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        assert (folder / "adapter_model.safetensors").is_file()
        inputs = json.loads((folder / CARD_INPUTS_NAME).read_text())
        assert inputs["federation"]["rounds"] == step
        assert inputs["training"]["global_step"] == step
        assert f"| rounds run | {step} |" in (folder / "README.md").read_text()
    # The last checkpoint's figures are the final ledger's.
    assert inputs["federation"]["bytes_total"] == federated_callback(trainer).ledger.bytes_total


def test_no_token_and_no_absolute_path_in_anything_written(tmp_path, caplog, capfd):
    base_dir = tmp_path / "private" / "base-model"
    tiny_bert().save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    model = lora_model(AutoModelForSequenceClassification.from_pretrained(base_dir))
    trainer = make_trainer(
        tmp_path, model, federated=True, hub_token=TOKEN, save_strategy="steps", save_steps=2, report_to="none"
    )
    with caplog.at_level("INFO"):
        trainer.train()
        trainer.evaluate()
        trainer.save_model()
        trainer.create_model_card()
    out = Path(trainer.args.output_dir)
    files = written_files(out)
    assert any(p.name == "training_args.bin" for p in files)
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    for path in [p for p in files if p.name in ("README.md", CARD_INPUTS_NAME)]:
        text = path.read_text()
        for private in (str(tmp_path), str(base_dir), os.getcwd(), os.path.expanduser("~") + "/", sys.prefix):
            assert private not in text, (path, private)
    # The logs and the console do not carry it either.
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    # The saved arguments load back without a token; the trainer in memory still has it, for the upload.
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert saved.hub_token is None
    assert trainer.args.hub_token == TOKEN and isinstance(trainer.args.hub_token, HubToken)
    assert TOKEN not in repr(trainer.args) and TOKEN not in str(trainer.args.to_dict())


def test_public_model_name():
    assert public_model_name("org/model") == "org/model"
    assert public_model_name(None) is None
    assert public_model_name(str(ROOT)) is None  # a local folder says nothing about the base model elsewhere
    try:
        from hf_hiso.embedded import minilm_path

        path = minilm_path()
    except (ImportError, FileNotFoundError):
        pytest.skip("embedded MiniLM not installed")
    assert public_model_name(path) == "sentence-transformers/all-MiniLM-L6-v2"


def test_model_card_inputs_without_evaluation(tmp_path):
    trainer = make_trainer(tmp_path, tiny_bert(), federated=False, max_steps=1)
    trainer.train()
    inputs = model_card_inputs(trainer)
    assert inputs["metrics"] == {} and inputs["federation"] is None
    text = str(render_model_card(inputs))
    assert "No evaluation was recorded" in text
    json.dumps(inputs)  # JSON-able


def test_template_ships_with_the_package():
    path = template_path()
    assert path.is_file() and "{{ card_data }}" in path.read_text()


def rendered_examples() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "model_cards").glob(f"*/{CARD_INPUTS_NAME}"))


def test_model_cards_folder_is_in_step_with_the_template():
    examples = rendered_examples()
    assert examples, "model_cards/ holds no rendered example (README.md + hiso_card.json)"
    for folder in examples:
        inputs = json.loads((folder / CARD_INPUTS_NAME).read_text())
        expected = str(render_model_card(inputs))
        assert (folder / "README.md").read_text() == expected, (
            f"{folder.name}/README.md is out of step with hf_hiso/templates/model_card.md; re-render it with "
            "`python -m hf_hiso.model_card model_cards/*/`"
        )
        assert inputs["federation"] is None or inputs["federation"]["bytes_total"] > 0
        for private in (os.path.expanduser("~") + "/", sys.prefix, str(ROOT)):
            assert private not in expected
