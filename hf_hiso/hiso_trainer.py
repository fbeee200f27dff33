"""`HiSoTrainer`: `transformers.Trainer` with HiSo's zeroth-order step in place of backpropagation.

Only `training_step` (measure the directional scalars instead of calling `backward`), the optimizer choice and `log`
(add the `zo/*` metrics) are overridden. The Trainer's own loop then gives gradient accumulation, LR schedules,
logging, evaluation, checkpoints and `resume_from_checkpoint` unchanged: `optimizer.step()` is where the queued
scalars become a parameter update, and the optimizer's state (the preconditioner) is checkpointed like Adam's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate.data_loader import BatchSamplerShard
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer import logger as trainer_logger
from transformers.utils import logging

from .checkpointing import (
    KNOWN_CHECKPOINT_FILES,
    CheckpointError,
    atomic_torch_save,
    checkpoint_problem,
    newest_complete_checkpoint,
    write_manifest,
)
from .curvature import role_blocks
from .hiso_config import HiSoConfig, ZOArguments, check_trainer_compatibility
from .zo_env import describe_zo_settings, resolve_zo_arguments
from .zo_optimizer import HiSoOptimizer

logger = logging.get_logger(__name__)


def check_process_group(args: TrainingArguments) -> None:
    """Refuses launched processes that did not join one group, before any training starts: on a machine without an
    accelerator, transformers forms the (gloo) group of `accelerate launch --multi_gpu` / `torchrun` only with
    `use_cpu=True`, and each process would otherwise train alone into the same `output_dir`."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > args.world_size:
        raise ValueError(
            f"The launcher started {launched} processes (WORLD_SIZE) but the Trainer runs as {args.world_size}: each "
            "process would train alone and write the same output_dir. On a machine without GPUs set `use_cpu=True` "
            "(`--use_cpu` on the script's command line; `HiSoConfig` sets it itself) so that the processes form one "
            "gloo group."
        )


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> HiSoOptimizer | None:
    """The `HiSoOptimizer` inside accelerate's `AcceleratedOptimizer` wrapper(s)."""
    while optimizer is not None and not isinstance(optimizer, HiSoOptimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer if isinstance(optimizer, HiSoOptimizer) else None


class HiSoTrainer(Trainer):
    r"""
    A drop-in replacement for [`~transformers.Trainer`] that fine-tunes with HiSo's zeroth-order optimizer: each
    optimizer step evaluates the loss at `x` and at `x + mu * z_p` for `P` random directions (no backward pass, no
    `.grad`), and updates `x <- x - (lr / P) * sum_p g_p z_p` with a learned diagonal preconditioner.

    Args:
        args ([`HiSoConfig`] or [`~transformers.TrainingArguments`]): a plain `TrainingArguments` (from an existing
            script) is accepted; the zeroth-order settings then take the [`HiSoConfig`] defaults.
        *others*: exactly as [`~transformers.Trainer`]. `optimizers` may carry a [`HiSoOptimizer`], nothing else.

    With a [`FederatedZOCallback`] among the callbacks, every Trainer step is one federated round.
    """

    _tag_names = ["hf_hiso", "zeroth-order"]

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *pos_args: Any,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = HiSoConfig(output_dir="tmp_trainer")
        check_trainer_compatibility(args)
        check_process_group(args)
        # Where each setting came from ("config", "env" or "default"), for the line logged when training starts.
        self.zo_args, self.zo_args_sources = resolve_zo_arguments(ZOArguments, args)
        if optimizers[0] is not None and unwrap_optimizer(optimizers[0]) is None:
            raise ValueError(
                f"`optimizers[0]` must be a HiSoOptimizer (or None to build one from the config), got "
                f"{type(optimizers[0]).__name__}: a gradient optimizer has no gradients to work with in HiSoTrainer."
            )
        if optimizer_cls_and_kwargs is not None and not issubclass(optimizer_cls_and_kwargs[0], HiSoOptimizer):
            raise ValueError("`optimizer_cls_and_kwargs` must name HiSoOptimizer (or a subclass) in HiSoTrainer.")
        if optimizers[0] is None and optimizer_cls_and_kwargs is None:
            optimizer_cls_and_kwargs = (
                HiSoOptimizer,
                {"lr": args.learning_rate, **self.zo_args.optimizer_kwargs(seed=args.seed)},
            )
        # Set by a FederatedZOCallback: runs a whole federated round in place of the centralized step.
        self.zo_round_runner: Callable[[HiSoTrainer, nn.Module, dict], torch.Tensor] | None = None
        self._zo_log_sums = {"steps": 0, "scalar_abs": 0.0, "scalar_sq": 0.0, "count": 0}
        self._zo_model_uses_num_items: bool | None = None
        self._zo_step_hook: Any = None
        # Extra `fed/*`-style metrics merged into every training log (a federated callback registers one).
        self.zo_log_providers: list[Callable[[], dict[str, float]]] = []
        # The checkpoint `train()` resumes from, for callbacks that keep state beside it.
        self.zo_resume_from: str | None = None
        super().__init__(
            model,
            args,
            *pos_args,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            **kwargs,
        )
        for callback in self.callback_handler.callbacks:
            self._attach_callback(callback)

    def _attach_callback(self, callback: Any) -> None:
        # Callbacks that drive the optimization (FederatedZOCallback) need the trainer, which the TrainerCallback
        # events do not pass.
        if hasattr(callback, "attach"):
            callback.attach(self)

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)
        added = self.callback_handler.callbacks[-1]
        self._attach_callback(added)

    def _zo_checkpoint_files(self) -> dict[str, Any]:
        # Files that callbacks (FederatedZOCallback) keep inside each checkpoint, by name.
        return {name: cb for cb in self.callback_handler.callbacks for name in getattr(cb, "zo_checkpoint_files", ())}

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        required = tuple(self._zo_checkpoint_files())
        if resume_from_checkpoint is True:
            resume_from_checkpoint, skipped = newest_complete_checkpoint(self.args.output_dir, required)
            for folder, reason in skipped:
                logger.warning(f"Skipping {folder} for the resume: {reason}.")
            if skipped:
                logger.warning(f"Resuming from {resume_from_checkpoint}, the newest complete checkpoint.")
        if resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint, required)
            if problem is not None:
                raise CheckpointError(
                    f"Cannot resume from {resume_from_checkpoint}: {problem}. Resume from an older complete "
                    "checkpoint (`resume_from_checkpoint=True` picks the newest complete one) or start afresh."
                )
            extra = [n for n in KNOWN_CHECKPOINT_FILES if n not in required]
            found = [n for n in extra if os.path.exists(os.path.join(resume_from_checkpoint, n))]
            if found:
                raise ValueError(
                    f"{resume_from_checkpoint} holds {found[0]} (a federated run), but this trainer has no "
                    "FederatedZOCallback: resuming would continue centrally. Pass the same callback as the run that "
                    "wrote it."
                )
        self.zo_resume_from = resume_from_checkpoint or None
        if self.is_world_process_zero():
            # Beside the Trainer's own "***** Running training *****", so the script's log level governs both.
            trainer_logger.info(describe_zo_settings(self.zo_args, self.zo_args_sources))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # The HiSo files go beside the optimizer's state, before `trainer_state.json` marks the checkpoint complete
        # and before the Trainer rotates old checkpoints (`hf_hiso.checkpointing`).
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            for name, callback in self._zo_checkpoint_files().items():
                atomic_torch_save(callback.state_dict(), os.path.join(output_dir, name))
            write_manifest(output_dir)

    # ---- optimizer ---------------------------------------------------------------------------------------------

    @property
    def zo_optimizer(self) -> HiSoOptimizer:
        opt = unwrap_optimizer(self.optimizer)
        if opt is None:
            raise RuntimeError("HiSoTrainer has no HiSoOptimizer yet: call `train()` or `create_optimizer()` first.")
        return opt

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        configured = self.optimizer_cls_and_kwargs
        if self.optimizer is None and configured is not None and configured[1].get("curvature_blocks") == "role":
            # One curvature block per role needs the parameter names, which only the model has.
            blocks = role_blocks(self.model if model is None else model)
            self.optimizer_cls_and_kwargs = (configured[0], {**configured[1], "curvature_blocks": blocks})
        try:
            optimizer = super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = configured
        zo = unwrap_optimizer(optimizer)
        if zo is None:
            raise ValueError(f"HiSoTrainer needs a HiSoOptimizer, got {type(optimizer).__name__}.")
        if self.accelerator.num_processes > 1:
            # Data parallelism: each process measured the scalars on its shard of the batch; their mean over processes
            # is the full batch's scalar. P numbers per step are all that is communicated.
            zo.scalar_reduce = self._mean_over_processes
        if self._zo_step_hook is not None:
            self._zo_step_hook.remove()
        self._zo_step_hook = zo.register_step_post_hook(self._zo_record_step)
        return optimizer

    def _zo_record_step(self, optimizer: HiSoOptimizer, *_: Any) -> None:
        # The `zo/scalar_*` metrics of a centralized step are those of the scalars the update used: the whole batch's
        # (micro-batches summed), averaged over processes, so they do not depend on the process count. A federated
        # round records its clients' reports itself.
        if self.zo_round_runner is None and optimizer.last_slopes is not None:
            self.zo_record(optimizer.last_slopes, forward_passes=0)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        """Under data parallelism the model is prepared without `DistributedDataParallel`.

        HiSo never runs a backward pass, so DDP would only add its gradient buckets (a copy of the trainable parameters
        in device memory) and a buffer broadcast; the one all-reduce per step is the optimizer's, over the P scalars.
        What DDP does that HiSo needs, identical replicas at the start, is done here once: parameters and buffers are
        broadcast from process 0, so a head initialised differently on each process cannot make the replicas drift.
        The prepared model is the model itself, so the Trainer's own `accelerator.prepare` leaves it as it is.
        """
        model = super()._wrap_model(model, training, dataloader)
        acc = self.accelerator
        ddp_would_wrap = acc.multi_device or acc.distributed_type == DistributedType.MULTI_CPU
        prepared = getattr(model, "_is_accelerate_prepared", False)
        if training and model is self.model and ddp_would_wrap and not prepared:
            model = acc.prepare_model(model, evaluation_mode=True)
            if acc.num_processes > 1:
                with torch.no_grad():
                    for tensor in [*model.parameters(), *model.buffers()]:
                        torch.distributed.broadcast(tensor.data, src=0)
        return model

    def get_train_dataloader(self) -> Any:
        """[`~transformers.Trainer.get_train_dataloader`]; in a federated run (a [`FederatedZOCallback`]) under several
        processes, not sharded: a round reads its clients' batches itself and the Trainer's batches only pace the
        rounds, so every process iterates all of them and an epoch is as many rounds as in one process."""
        dataloader = super().get_train_dataloader()
        batch_sampler = getattr(dataloader, "batch_sampler", None)
        if self.zo_round_runner is not None and isinstance(batch_sampler, BatchSamplerShard):
            # What the Trainer itself does to a sampler that must not be re-sharded (`BatchRebalanceSampler`).
            batch_sampler.num_processes, batch_sampler.process_index = 1, 0
        return dataloader

    def _mean_over_processes(self, scalars: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(scalars.to(self.accelerator.device), reduction="mean").cpu()

    # ---- the zeroth-order step ----------------------------------------------------------------------------------

    def zo_loss_scale(self, loss_fn: Callable, num_items_in_batch: Any) -> float:
        """The factor that makes the summed scalars of the micro-batches of one optimizer step equal the scalars of
        the whole batch: `1` when the loss is already normalised by `num_items_in_batch` (the whole step's item
        count), `1 / micro-batches` when it is a per-micro-batch mean (and `1 / (micro-batches * processes)` when
        `compute_loss` also multiplied that mean by the process count, see `zo_compute_loss_process_factor`).

        The Trainer infers the first case from the model's signature (`**kwargs`), which is wrong for models that
        accept the keyword but ignore it (e.g. `BertForSequenceClassification`): with gradient accumulation their
        loss would count twice. So, once per run, the loss is evaluated with and without `num_items_in_batch`; if
        both agree, the model ignores it.
        """
        ga = self.current_gradient_accumulation_steps
        dp = self.zo_compute_loss_process_factor(num_items_in_batch)
        if ga == 1 and dp == 1:
            return 1.0
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        elif self.compute_loss_func is not None:
            scaled = True
        elif not self.model_accepts_loss_kwargs or num_items_in_batch is None:
            scaled = False
        else:
            if self._zo_model_uses_num_items is None:
                with_items = loss_fn()
                without_items = loss_fn(num_items_in_batch=None)
                # `compute_loss` multiplies by `dp` only when it is given `num_items_in_batch`.
                self._zo_model_uses_num_items = not torch.allclose(with_items, without_items * dp)
            scaled = self._zo_model_uses_num_items
        return 1.0 if scaled else 1.0 / (ga * dp)

    def zo_compute_loss_process_factor(self, num_items_in_batch: Any) -> int:
        """The factor by which `Trainer.compute_loss` multiplies the loss under data parallelism: the process count
        when `average_tokens_across_devices=True` (the plain `TrainingArguments` default) and it believes the loss was
        normalised by the item count of all processes, else 1. Right for models that use `num_items_in_batch` (the
        mean over processes is then the loss of the combined batch); for models that ignore it, the scalars (and the
        logged loss) would be that many times too large, so `zo_loss_scale` divides it out."""
        if not (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return 1
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

    def zo_loss_fn(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Callable:
        """A closure evaluating the Trainer's loss (`compute_loss`, so `compute_loss_func` and label smoothing apply)
        on `inputs` at the current parameters."""

        def loss_fn(**override: Any) -> torch.Tensor:
            with self.compute_loss_context_manager():
                # A copy: `compute_loss` pops "labels" when `compute_loss_func` or label smoothing is set, and the
                # closure is called P + 1 times on the same batch.
                loss = self.compute_loss(model, dict(inputs), **{"num_items_in_batch": num_items_in_batch, **override})
            if self.args.n_gpu > 1:
                loss = loss.mean()
            return loss

        return loss_fn

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """Measures the directional scalars of this micro-batch and queues them in the optimizer (no backward).

        The forward passes run in eval mode (dropout off: `f(x)` and `f(x + mu z)` must see the same network) and
        without autograd. Returns the loss at the unperturbed parameters, scaled as the Trainer scales losses.
        """
        if self.zo_round_runner is not None:
            return self.zo_round_runner(self, model, inputs)
        opt = self.zo_optimizer
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()
        try:
            seed = opt.current_seed()
            loss_fn = self.zo_loss_fn(model, inputs, num_items_in_batch)
            with torch.no_grad():
                scale = self.zo_loss_scale(loss_fn, num_items_in_batch)
            loss0, slopes, curvatures = opt.measure(loss_fn, seed)
        finally:
            model.train(was_training)
        opt.accumulate(seed, slopes * scale, curvatures * scale)
        self.zo_forward_passes += self.zo_passes_per_step()  # the slopes are recorded after the step (`zo/*`)
        return (loss0 * scale).detach().to(self.args.device)

    def zo_passes_per_step(self) -> int:
        opt = unwrap_optimizer(self.optimizer)
        if opt is not None and opt.last_forward_passes is not None:
            # The optimizer counts its own loss evaluations (they vary by step with the curvature extension).
            return opt.last_forward_passes
        p = self.zo_args.zo_num_directions
        return p + 1 if self.zo_args.zo_difference == "forward" else 2 * p + 1

    @property
    def zo_forward_passes(self) -> int:
        """Loss evaluations spent on training so far (all clients in a federated run), kept in the optimizer's state
        so that it is checkpointed and continues after a resume."""
        opt = unwrap_optimizer(self.optimizer)
        return 0 if opt is None else opt.state["hiso"].get("forward_passes", 0)

    @zo_forward_passes.setter
    def zo_forward_passes(self, value: int) -> None:
        self.zo_optimizer.state["hiso"]["forward_passes"] = int(value)

    def zo_record(self, slopes: torch.Tensor, forward_passes: int) -> None:
        sums = self._zo_log_sums
        sums["scalar_abs"] += float(slopes.abs().sum())
        sums["scalar_sq"] += float(slopes.square().sum())
        sums["count"] += slopes.numel()
        self.zo_forward_passes += forward_passes

    # ---- logging -----------------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the `zo/*` metrics to the training logs (every `logging_steps`) and drops `grad_norm`, which would
        always be 0: no gradient exists."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            opt = unwrap_optimizer(self.optimizer)
            sums = self._zo_log_sums
            if sums["count"]:
                logs["zo/scalar_abs_mean"] = sums["scalar_abs"] / sums["count"]
                logs["zo/scalar_rms"] = (sums["scalar_sq"] / sums["count"]) ** 0.5
            logs["zo/forward_passes"] = self.zo_forward_passes
            if opt is not None:
                logs["zo/skipped_steps"] = opt.state["hiso"]["skipped_steps"]
                logs.update({f"zo/{k}": v for k, v in opt.hessian_stats().items()})
            self._zo_log_sums = {"steps": 0, "scalar_abs": 0.0, "scalar_sq": 0.0, "count": 0}
            for provider in self.zo_log_providers:
                logs.update(provider())
        super().log(logs, start_time)

    # ---- model card, saving, Hub ------------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        baseline_metrics: dict[str, float] | None = None,
    ) -> None:
        """Writes `README.md` (and its inputs, `hiso_card.json`) into `args.output_dir` from hf_hiso's card template:
        front matter (base model, datasets, library, tags, `model-index`), how to load the model or adapter, the
        `zo_*` settings, the federation and the bytes it communicated, the metrics, versions and the HiSo citation.
        Arguments as [`~transformers.Trainer.create_model_card`], plus `baseline_metrics` (a `trainer.evaluate()`
        from before training, shown beside the final metrics); they are remembered for the cards of later saves."""
        from .model_card import write_trainer_model_card

        write_trainer_model_card(
            self,
            self.args.output_dir,
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
            baseline_metrics=baseline_metrics,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """[`~transformers.Trainer.save_model`], plus the model card in the same folder (so checkpoints carry one
        too). The Hub token is wrapped first so that the saved `training_args.bin` never contains it."""
        from .model_card import protect_hub_token, write_trainer_model_card

        protect_hub_token(self.args)
        super().save_model(output_dir, _internal_call)
        write_trainer_model_card(self, output_dir if output_dir is not None else self.args.output_dir)

    def push_to_hub(self, *args: Any, **kwargs: Any):
        """[`~transformers.Trainer.push_to_hub`], with the local save done before any network call and a failed upload
        raised as a [`~hf_hiso.model_card.HubUploadError`] that says where the complete local save is."""
        from .model_card import hub_upload_error, protect_hub_token

        protect_hub_token(self.args)
        if self.hub_model_id is None:  # the repository is created first: save before contacting the Hub
            self.save_model(_internal_call=True)
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as err:
            raise hub_upload_error(err, self.args.output_dir) from err
