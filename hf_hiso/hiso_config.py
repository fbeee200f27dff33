"""`HiSoConfig`: `TrainingArguments` plus the zeroth-order settings of HiSo."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .curvature import BLOCKINGS, TARGETS, check_curvature_settings
from .estimators import parse_estimator_kwargs, resolve_estimator
from .zo_env import resolve_zo_arguments
from .zo_optimizer import check_step_settings, check_zo_settings, parse_cache_setting

logger = logging.get_logger(__name__)


@dataclass(repr=False)
class ZOArguments:
    """The zeroth-order settings, kept apart from `TrainingArguments` so that `HiSoTrainer` can apply their defaults
    to a plain `TrainingArguments` object from an existing script."""

    zo_eps: float = field(
        default=1e-3, metadata={"help": "Perturbation radius mu of the finite differences (the paper uses 1e-3)."}
    )
    zo_num_directions: int = field(
        default=5, metadata={"help": "Random directions P per step; a step costs P + 1 forward passes (forward)."}
    )
    zo_difference: str = field(
        default="forward",
        metadata={
            "help": "Finite difference: 'forward' (the paper, P + 1 passes) or 'central' (MeZO, 2P + 1 passes).",
            "choices": ["forward", "central"],
        },
    )
    zo_preconditioner: bool = field(
        default=True,
        metadata={"help": "Learn HiSo's diagonal preconditioner H; False keeps H = I (DeComFL / MeZO-style ZO-SGD)."},
    )
    zo_hessian_smooth: float = field(
        default=0.95, metadata={"help": "beta in H <- beta * H + (1 - beta) * (v**2 + eps): the weight of the old H."}
    )
    zo_hessian_damping: float = field(
        default=1e-8, metadata={"help": "eps in the H update (the paper's damping; the authors' code uses 0)."}
    )
    zo_hessian_update: str = field(
        default="last_local_step",
        metadata={
            "help": "Which local steps of a round update H: 'last_local_step' (the paper) or 'all_local_steps'.",
            "choices": ["last_local_step", "all_local_steps"],
        },
    )
    zo_generator: str = field(
        default="counter",
        metadata={
            "help": "How directions are drawn: 'counter' (a counter-based generator computed on each tensor's own "
            "device: the same numbers on the CPU and any accelerator, for any thread count, never a CPU draw copied "
            "to an accelerator), 'cpu' "
            "(torch's CPU generator, the default of versions up to 0.1: the same numbers everywhere, drawn on the CPU "
            "and copied) or 'device' (each device's torch generator: device-specific numbers). Checkpoints keep it; "
            "resuming with another one is refused.",
            "choices": ["counter", "cpu", "device"],
        },
    )
    zo_distribution: str = field(
        default="gaussian",
        metadata={
            "help": "Distribution of the directions' entries: 'gaussian' or 'rademacher' (+-1; cheaper to draw). "
            "Both have E[u u^T] = I.",
            "choices": ["gaussian", "rademacher"],
        },
    )
    zo_cache_directions: str = field(
        default="auto",
        metadata={
            "help": "Keep a step's P directions in memory (P x trainable parameters) instead of regenerating each "
            "one for perturbation, restoration and update: 'true' (faster, costs memory), 'false' (MeZO-style "
            "memory) or 'auto' (cache when the P directions take at most 1 GiB: adapters and models up to ~50 M "
            "trainable parameters at P = 5).",
            "choices": ["auto", "true", "false"],
        },
    )
    zo_estimator: str = field(
        default="default",
        metadata={
            "help": "How directions are chosen and the scalars become the update: 'default' (HiSo, or DeComFL with "
            "zo_preconditioner=False), or an experimental estimator of hf_hiso.experimental: 'normalized' (the "
            "slopes divided by their running RMS: a scale-free learning rate, like Adam's) or 'subset' (each "
            "direction perturbs a seeded subset of the trainable tensors, rescaled). All send one scalar per "
            "direction."
        },
    )
    zo_estimator_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Settings of `zo_estimator` as a dict or JSON string, e.g. '{\"beta\": 0.9}' for 'normalized' "
            "or '{\"fraction\": 0.25}' for 'subset'."
        },
    )
    zo_skip_nonfinite: bool = field(
        default=False,
        metadata={"help": "Skip and count a step with NaN/inf scalars instead of raising an error."},
    )
    zo_curvature: bool = field(
        default=False,
        metadata={
            "help": "Extension beyond the paper (off by default): replace HiSo's H by a per-block curvature "
            "preconditioner learned from second-difference scalars c = (f(x+mu z) + f(x-mu z) - 2 f(x)) / mu**2. "
            "Curvature steps use central differences (2P + 1 passes) and send one more scalar per direction."
        },
    )
    zo_curvature_blocks: str = field(
        default="tensor",
        metadata={
            "help": "Blocks of the curvature preconditioner: 'tensor' (one per trainable tensor), 'group' (one per "
            "optimizer parameter group) or 'role' (one per parameter name without its layer numbers: the query LoRA A "
            "matrices of all layers share a block; fewer unknowns to learn).",
            "choices": list(BLOCKINGS),
        },
    )
    zo_curvature_every: int = field(
        default=1,
        metadata={
            "help": "Measure curvature on a seed-chosen 1/k of the steps (k=1: every step). The others cost P + 1 "
            "passes with forward differences instead of 2P + 1."
        },
    )
    zo_curvature_forget: float = field(
        default=0.99,
        metadata={"help": "Forgetting factor of the curvature regression per curvature step, in (0, 1]."},
    )
    zo_curvature_floor: float = field(
        default=1e-3,
        metadata={"help": "Smallest block curvature used, relative to the mean curvature over entries, in (0, 1]."},
    )
    zo_curvature_spread: float = field(
        default=0.75,
        metadata={
            "help": "Half-width w of the random per-block factors a**2 ~ U[1-w, 1+w] of curvature steps, in [0, 1]; "
            "they make block contributions vary between directions (0 turns them off)."
        },
    )
    zo_curvature_prior: float = field(
        default=0.1,
        metadata={
            "help": "Weight (> 0, in pseudo-rows per block) of the shrinkage of block curvatures toward their pooled "
            "value; it fades as regression rows come in."
        },
    )
    zo_curvature_target: str = field(
        default="curvature",
        metadata={
            "help": "What sets the block values of the curvature preconditioner: 'curvature' (H_b proportional to the "
            "learned block curvature theta_b), 'snr' (H_b proportional to theta_b / gamma_b, gamma_b the mean "
            "squared gradient per entry learned from the squared slopes: long directions for the blocks with the "
            "most gradient signal per unit curvature) or 'energy' (H_b inversely proportional to the block's gradient "
            "energy n_b gamma_b: short directions for blocks that hold little of the gradient, such as a LoRA adapter "
            "at its B = 0 start).",
            "choices": list(TARGETS),
        },
    )
    zo_curvature_steps: int = field(
        default=0,
        metadata={
            "help": "Learn the curvature preconditioner on this many curvature steps, then keep it: later steps are "
            "plain steps with the learned block scale (the configured difference, no curvature scalars). 0: learn on "
            "every curvature step."
        },
    )

    def check_zo(self) -> None:
        for f in fields(ZOArguments):
            if f.type in ("bool", bool):
                value = getattr(self, f.name)
                if not isinstance(value, bool):
                    # From Python a string such as "false" would be truthy; HfArgumentParser converts the CLI's.
                    raise ValueError(f"`{f.name}` must be True or False, got {value!r}")
        self.zo_cache_directions = parse_cache_setting(self.zo_cache_directions, name="zo_cache_directions")
        check_zo_settings(
            zo_eps=self.zo_eps,
            num_directions=self.zo_num_directions,
            difference=self.zo_difference,
            hessian_smooth=self.zo_hessian_smooth,
            hessian_damping=self.zo_hessian_damping,
            hessian_update=self.zo_hessian_update,
            generator=self.zo_generator,
            distribution=self.zo_distribution,
            prefix="zo_",
        )
        self.zo_estimator_kwargs = parse_estimator_kwargs(self.zo_estimator_kwargs, "zo_estimator_kwargs")
        # Resolved here only to check the name and settings before training (the optimizer builds its own).
        estimator = resolve_estimator(self.zo_estimator, self.zo_estimator_kwargs, prefix="zo_")
        if self.zo_curvature and estimator.name != "default":
            raise ValueError(
                f"`zo_estimator` must be 'default' with `zo_curvature=True`, got {self.zo_estimator!r}: the block "
                "curvature preconditioner sets the directions itself."
            )
        if self.zo_curvature_blocks not in BLOCKINGS:
            raise ValueError(f"`zo_curvature_blocks` must be one of {BLOCKINGS}, got {self.zo_curvature_blocks!r}")
        check_curvature_settings(
            every=self.zo_curvature_every,
            forget=self.zo_curvature_forget,
            floor=self.zo_curvature_floor,
            spread=self.zo_curvature_spread,
            prior=self.zo_curvature_prior,
            target=self.zo_curvature_target,
            steps=self.zo_curvature_steps,
            prefix="zo_curvature_",
        )

    @classmethod
    def from_args(cls, args: Any) -> ZOArguments:
        """The ZO settings of `args`; for those it does not have (a plain `TrainingArguments`), the `HISO_ZO_*`
        environment variables, else the HiSo defaults (see `hf_hiso.zo_env`)."""
        return resolve_zo_arguments(cls, args)[0]

    def optimizer_kwargs(self, seed: int) -> dict[str, Any]:
        return {
            "zo_eps": self.zo_eps,
            "num_directions": self.zo_num_directions,
            "difference": self.zo_difference,
            "preconditioner": self.zo_preconditioner,
            "hessian_smooth": self.zo_hessian_smooth,
            "hessian_damping": self.zo_hessian_damping,
            "hessian_update": self.zo_hessian_update,
            "generator": self.zo_generator,
            "distribution": self.zo_distribution,
            "estimator": self.zo_estimator,
            "estimator_kwargs": dict(self.zo_estimator_kwargs),
            "cache_directions": self.zo_cache_directions,
            "skip_nonfinite": self.zo_skip_nonfinite,
            "seed": seed,
            "curvature": self.zo_curvature,
            "curvature_blocks": self.zo_curvature_blocks,
            "curvature_every": self.zo_curvature_every,
            "curvature_forget": self.zo_curvature_forget,
            "curvature_floor": self.zo_curvature_floor,
            "curvature_spread": self.zo_curvature_spread,
            "curvature_prior": self.zo_curvature_prior,
            "curvature_target": self.zo_curvature_target,
            "curvature_steps": self.zo_curvature_steps,
        }


def check_trainer_compatibility(args: TrainingArguments) -> None:
    """Refuses `TrainingArguments` that cannot work with a zeroth-order optimizer, before any training starts."""
    check_step_settings(args.learning_rate, args.weight_decay, prefix="")
    if args.fp16:
        raise ValueError(
            "`fp16=True` is not supported by HiSo: fp16 training relies on a gradient scaler, and a zeroth-order step "
            "has no gradient to scale; finite differences of fp16 losses also lose most of their digits. Use "
            "`bf16=True` or fp32."
        )
    if args.deepspeed:
        raise ValueError(
            "`deepspeed` is not supported by HiSo: DeepSpeed owns the optimizer step and the gradient buffers that a "
            "zeroth-order step does not have. Use plain data parallelism (`accelerate launch --multi_gpu`), where "
            "only P scalars are all-reduced per step."
        )
    if args.fsdp:
        raise ValueError(
            "`fsdp` is not supported by HiSo yet: the in-place perturbation of sharded parameters needs every rank "
            "to perturb its own shard with the same directions, which is not implemented. Use `accelerate launch "
            "--multi_gpu` (data parallel, scalars all-reduced) instead."
        )


@dataclass(repr=False)
class HiSoConfig(ZOArguments, TrainingArguments):
    r"""
    Configuration of [`HiSoTrainer`]: every [`~transformers.TrainingArguments`] field plus the zeroth-order settings
    (`zo_*`). Parsed by `HfArgumentParser` like any `TrainingArguments`.

    Defaults changed from `TrainingArguments` (re-declared below):
        learning_rate: `1e-4`. Zeroth-order steps are noisier than gradients; the HiSo paper tunes its rate per task.
        max_grad_norm: `0.0`. There is no gradient to clip.
        average_tokens_across_devices: `False`. The scalars are averaged over processes instead, and transformers
            would otherwise rescale the logged loss under several processes.
        use_cpu: set to `True` when several processes are launched (`WORLD_SIZE > 1`) on a machine without an
            accelerator, so that `accelerate launch --multi_gpu --num_processes 2` works on CPUs as it does on GPUs.
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "The learning rate eta of the ZO update."})
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Unused by zeroth-order training (there is no gradient); kept at 0."}
    )
    average_tokens_across_devices: bool = field(
        default=False,
        metadata={"help": "Kept False: HiSo all-reduces the directional scalars, not token counts."},
    )

    def __post_init__(self):
        # Checked before TrainingArguments' own post-init, which would try to import DeepSpeed or set up FSDP first.
        self.check_zo()
        check_trainer_compatibility(self)
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # `accelerate launch --multi_gpu` / `torchrun` on a machine without GPUs: transformers joins the processes
            # into a (gloo) group only with `use_cpu=True`; otherwise each would train alone into the same output_dir.
            logger.info("Several processes and no accelerator: setting `use_cpu=True` so that they form one group.")
            self.use_cpu = True
        super().__post_init__()
