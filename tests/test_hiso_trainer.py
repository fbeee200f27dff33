import json

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from transformers import HfArgumentParser, TrainingArguments

from hf_hiso import HiSoConfig, HiSoOptimizer, HiSoTrainer
from hf_hiso.hiso_trainer import unwrap_optimizer


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_train_moves_parameters_without_gradients(tmp_path):
    model = tiny_bert()
    data = toy_dataset(16)
    before = snapshot(model)
    # One batch holds the whole data set, so the first logged loss is the loss of the initial model on all of it.
    args = hiso_args(tmp_path, per_device_train_batch_size=16, max_steps=3)
    trainer = HiSoTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for n, p in model.named_parameters():
        assert p.grad is None, n
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before)
    ref = tiny_bert().eval()
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    with torch.no_grad():
        expected = float(ref(**batch).loss)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert "grad_norm" not in logged[0]
    assert logged[0]["zo/forward_passes"] == 6  # P + 1 per step
    assert {"zo/scalar_abs_mean", "zo/hessian_mean", "zo/hessian_min", "zo/hessian_max"} <= logged[0].keys()
    assert logged[-1]["zo/hessian_mean"] != 1.0


def test_plain_training_arguments_get_hiso_defaults(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        disable_tqdm=True,
    )
    trainer = HiSoTrainer(model=tiny_bert(), args=args, train_dataset=toy_dataset(16))
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.num_directions == HiSoConfig.zo_num_directions
    assert opt.zo_eps == HiSoConfig.zo_eps and opt.preconditioner
    assert opt.global_step == 2


def test_gradient_accumulation_equals_large_batch(tmp_path):
    data = toy_dataset(16)
    results = []
    for bs, ga in [(16, 1), (8, 2)]:
        model = tiny_bert()
        args = hiso_args(
            tmp_path / f"{bs}",
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=3,
            lr_scheduler_type="linear",
        )
        trainer = HiSoTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        results.append((snapshot(model), trainer.zo_optimizer.hessian(), trainer.state.log_history))
    (p1, h1, log1), (p2, h2, log2) = results
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=0, atol=1e-5)
    for a, b in zip(h1, h2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    loss1 = [h["loss"] for h in log1 if "loss" in h]
    loss2 = [h["loss"] for h in log2 if "loss" in h]
    assert loss1 == pytest.approx(loss2, rel=1e-5)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    data = toy_dataset(32)
    full_model = tiny_bert()
    full = HiSoTrainer(model=full_model, args=hiso_args(tmp_path / "full", max_steps=6), train_dataset=data)
    full.train()

    args = hiso_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    first = HiSoTrainer(model=tiny_bert(), args=args, train_dataset=data)
    first.train()
    ckpt = tmp_path / "cut" / "out" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists()
    resumed_model = tiny_bert(seed=123)  # weights come from the checkpoint
    resumed = HiSoTrainer(model=resumed_model, args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    for a, b in zip(full.zo_optimizer.hessian(), resumed.zo_optimizer.hessian(), strict=True):
        torch.testing.assert_close(a, b)
    assert resumed.zo_optimizer.global_step == 6
    # The forward-pass count is checkpointed with the optimizer: it goes on from the checkpoint's 3 x (P + 1).
    assert resumed.zo_forward_passes == full.zo_forward_passes == 6 * (full.zo_optimizer.num_directions + 1)


def test_frozen_parameters_stay_put(tmp_path):
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    HiSoTrainer(model=model, args=hiso_args(tmp_path), train_dataset=toy_dataset()).train()
    for n, p in model.named_parameters():
        if n.startswith("bert.embeddings"):
            assert torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def test_peft_lora_only_adapter_moves(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_bert(),
        LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights="gaussian"),
    )
    before = snapshot(model)
    trainer = HiSoTrainer(model=model, args=hiso_args(tmp_path), train_dataset=toy_dataset())
    trainer.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n
    assert len(trainer.zo_optimizer.params) == len(trainable)


def test_evaluation_and_scheduler_work(tmp_path):
    args = hiso_args(tmp_path, eval_strategy="steps", eval_steps=2, lr_scheduler_type="linear", warmup_steps=1)
    trainer = HiSoTrainer(
        model=tiny_bert(), args=args, train_dataset=toy_dataset(), eval_dataset=toy_dataset(8, seed=1)
    )
    trainer.train()
    assert any("eval_loss" in h for h in trainer.state.log_history)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] != lrs[-1]


def test_hf_argument_parser_reads_zo_fields(tmp_path):
    (cfg,) = HfArgumentParser(HiSoConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--zo_num_directions",
            "3",
            "--zo_difference",
            "central",
            "--zo_preconditioner",
            "false",
            "--zo_cache_directions",
            "false",
            "--report_to",
            "none",
        ]
    )
    assert cfg.zo_num_directions == 3 and cfg.zo_difference == "central" and cfg.zo_preconditioner is False
    assert cfg.zo_cache_directions is False
    json.dumps(cfg.to_dict())  # serialisable, as TrainingArguments must be


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"zo_eps": -1.0}, "zo_eps"),
        ({"zo_num_directions": 0}, "zo_num_directions"),
        ({"zo_difference": "backward"}, "zo_difference"),
        ({"zo_hessian_smooth": 1.5}, "zo_hessian_smooth"),
        ({"zo_hessian_update": "sometimes"}, "zo_hessian_update"),
        ({"zo_generator": "tpu"}, "zo_generator"),
        ({"zo_distribution": "uniform"}, "zo_distribution"),
        ({"zo_cache_directions": "maybe"}, "zo_cache_directions"),
        ({"fp16": True}, "fp16"),
        ({"deepspeed": "ds_config.json"}, "deepspeed"),
        ({"fsdp": "full_shard"}, "fsdp"),
    ],
)
def test_rejected_configurations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        HiSoConfig(output_dir=str(tmp_path), report_to="none", **overrides)


def test_rejected_with_plain_training_arguments_and_foreign_optimizer(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), fp16=True, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="fp16"):
        HiSoTrainer(model=tiny_bert(), args=args)
    model = tiny_bert()
    with pytest.raises(ValueError, match="HiSoOptimizer"):
        HiSoTrainer(model=model, args=hiso_args(tmp_path), optimizers=(torch.optim.AdamW(model.parameters()), None))
    opt = HiSoOptimizer(model.parameters(), lr=0.1)
    trainer = HiSoTrainer(model=model, args=hiso_args(tmp_path), train_dataset=toy_dataset(), optimizers=(opt, None))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer) is opt and opt.global_step == 4


def test_nan_loss_gives_clear_error_and_keeps_model(tmp_path):
    from hf_hiso import NonFiniteScalarError

    model = tiny_bert()
    before = snapshot(model)

    def nan_loss(outputs, labels, num_items_in_batch=None):
        return outputs.logits.sum() * float("nan")

    trainer = HiSoTrainer(
        model=model, args=hiso_args(tmp_path), train_dataset=toy_dataset(), compute_loss_func=nan_loss
    )
    with pytest.raises(NonFiniteScalarError, match="step 0"):
        trainer.train()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
