"""Model cards for HiSo runs, rendered from the Jinja template shipped in the package (`templates/model_card.md`).

A card is built in two steps, so that rendered examples can be checked against the template at any time:

1. [`model_card_inputs`] collects everything the card says from a [`HiSoTrainer`] into a JSON-able dict: base
   model, data, adapter, the `zo_*` settings, the federation and its communication ledger, the metrics and the
   framework versions. No Hub token and no absolute path of the user's machine ever enters it.
2. [`render_model_card`] turns such a dict into a `huggingface_hub.ModelCard` (front matter through
   `ModelCardData` / `EvalResult`, body through the template). Rendering is a pure function of the dict.

[`write_model_card`] writes both (`README.md` and `hiso_card.json`) into a folder; `HiSoTrainer` calls it on
`save_model`, on checkpoints and in `push_to_hub`.
"""

from __future__ import annotations

import enum
import importlib.metadata
import json
import os
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

if TYPE_CHECKING:
    from .hiso_trainer import HiSoTrainer

__all__ = [
    "CARD_INPUTS_NAME",
    "HISO_CITATION",
    "HubToken",
    "HubUploadError",
    "format_bytes",
    "hub_upload_error",
    "model_card_inputs",
    "protect_hub_token",
    "public_model_name",
    "render_model_card",
    "rerender",
    "template_path",
    "write_model_card",
    "write_trainer_model_card",
]

CARD_INPUTS_NAME = "hiso_card.json"
TEMPLATE_NAME = "model_card.md"
EMBEDDED_MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

HISO_CITATION = """@inproceedings{li2026hiso,
  title     = {Converge Faster, Talk Less: Hessian-Informed Federated Zeroth-Order Optimization},
  author    = {Li and others},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026}
}"""

FRAMEWORKS = ("hf_hiso", "transformers", "peft", "torch", "accelerate", "datasets", "huggingface_hub")

ZO_LABELS = {
    "zo_eps": "perturbation radius mu (`zo_eps`)",
    "zo_num_directions": "directions per step P (`zo_num_directions`)",
    "zo_difference": "finite difference (`zo_difference`)",
    "zo_preconditioner": "learned preconditioner H (`zo_preconditioner`)",
    "zo_hessian_smooth": "H smoothing beta (`zo_hessian_smooth`)",
    "zo_hessian_damping": "H damping eps (`zo_hessian_damping`)",
    "zo_hessian_update": "local steps that update H (`zo_hessian_update`)",
    "zo_generator": "direction generator (`zo_generator`)",
    "zo_distribution": "direction distribution (`zo_distribution`)",
}


class HubUploadError(RuntimeError):
    """An upload to the Hub failed; the local save (model or adapter, tokenizer, card) is complete."""


def hub_upload_error(err: BaseException, output_dir: str) -> HubUploadError:
    """A [`HubUploadError`] that says what failed, what to check, and where the complete local save is."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    first_line = next((line for line in str(err).splitlines() if line.strip()), "")
    hint = ""
    if status in (401, 403):
        hint = " The Hub refused the token: check `hub_token` (or `HF_TOKEN`) and that it may write to the repository."
    elif status is not None and status >= 500:
        hint = " The Hub answered with a server error; retrying later may succeed."
    return HubUploadError(
        f"Upload to the Hub failed: {type(err).__name__}{f' (HTTP {status})' if status else ''}: {first_line}.{hint} "
        f"The model, its tokenizer and its card are saved locally in `{output_dir}`; retry with "
        "`trainer.push_to_hub()` or upload that folder yourself."
    )


class HubToken(str):
    """A Hub token that never reaches a file: pickling it (`torch.save` of the training arguments, as the Trainer
    does into `training_args.bin`) stores `None`, while copies in memory keep the value for the upload itself."""

    def __reduce__(self):
        return (type(None), ())

    def __copy__(self) -> HubToken:
        return self

    def __deepcopy__(self, memo: dict) -> HubToken:
        return self

    def __repr__(self) -> str:
        return "'<HUB_TOKEN>'"


def protect_hub_token(args: Any) -> None:
    """Wraps `args.hub_token` in a [`HubToken`], so that no saved copy of `args` holds it (idempotent)."""
    token = getattr(args, "hub_token", None)
    if isinstance(token, str) and token and not isinstance(token, HubToken):
        args.hub_token = HubToken(token)


def template_path() -> Path:
    """The Jinja template shipped in the package."""
    return Path(str(resources.files("hf_hiso") / "templates" / TEMPLATE_NAME))


def _embedded_minilm() -> str | None:
    try:
        from .embedded import minilm_path

        return os.path.realpath(minilm_path())
    except (ImportError, FileNotFoundError):
        return None


def public_model_name(name_or_path: str | None) -> str | None:
    """A name for a model that can appear in a card: a Hub id as is; the embedded MiniLM folder as its Hub id; any
    other local folder as `None` (its path is private to this machine and means nothing elsewhere).

    Args:
        name_or_path: a Hub id or a local folder.
    """
    if not name_or_path:
        return None
    name = str(name_or_path)
    local = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    if not local:
        return name
    if os.path.realpath(os.path.expanduser(name)) == _embedded_minilm():
        return EMBEDDED_MINILM_ID
    return None


def framework_versions() -> dict[str, str]:
    out = {}
    for name in FRAMEWORKS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def format_bytes(n: int | float) -> str:
    """`"1,234,567 B (1.2 MiB)"`."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    exact = f"{int(n):,} B"
    return exact if unit == "B" else f"{exact} ({value:,.1f} {unit})"


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):  # PeftType, SchedulerType, ...: their value, not "PeftType.LORA"
        return _json_safe(value.value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [_json_safe(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def _eval_metrics(log_history: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float], int | None]:
    """`(final, before, step)`: the last evaluation, the one at step 0 if training followed it, and the step."""
    evals = [entry for entry in log_history if "eval_loss" in entry or any(k.startswith("eval_") for k in entry)]
    skip = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")

    def metrics(entry: dict[str, Any]) -> dict[str, float]:
        return {
            k[len("eval_") :]: float(v)
            for k, v in entry.items()
            if k.startswith("eval_") and not k.endswith(skip) and isinstance(v, int | float)
        }

    if not evals:
        return {}, {}, None
    final = evals[-1]
    before = evals[0] if evals[0].get("step", 0) == 0 and final.get("step", 0) > 0 else None
    return metrics(final), metrics(before) if before else {}, final.get("step")


def _peft_summary(model: Any) -> dict[str, Any] | None:
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or not config:
        return None
    cfg = config.get("default", next(iter(config.values())))
    keys = (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "layers_to_transform",
        "init_lora_weights",
        "modules_to_save",
        "base_model_name_or_path",
    )
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    out = {k: _json_safe(data.get(k)) for k in keys if data.get(k) is not None}
    out["base_model_name_or_path"] = public_model_name(out.get("base_model_name_or_path"))
    return out


def _auto_class(model: Any) -> str:
    base = getattr(model, "get_base_model", lambda: model)()
    name = type(base).__name__
    if name == "LabelDescriptionClassifier":
        return LABEL_HEAD_CLASS
    for suffix, auto in (
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


# How cards name the label-description classifier of `hf_hiso.heads` (a stock encoder plus a head file).
LABEL_HEAD_CLASS = "LabelDescriptionClassifier"

PIPELINE_TAGS = {
    LABEL_HEAD_CLASS: "text-classification",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
}


def _federated_callback(trainer: Any) -> Any:
    for callback in trainer.callback_handler.callbacks:
        if callable(getattr(callback, "federation_summary", None)):
            return callback
    return None


def model_card_inputs(
    trainer: HiSoTrainer,
    *,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
    baseline_metrics: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Everything the card of `trainer`'s model says, as a JSON-able dict (the arguments of
    [`~transformers.Trainer.create_model_card`], plus `baseline_metrics`).

    The base model is `finetuned_from` or the model's own name, passed through [`public_model_name`]; the model name
    is `model_name`, else the last part of `hub_model_id`, else the output folder's name. The final metrics are the
    last evaluation in the trainer's log; the "before training" column is `baseline_metrics` (the output of a
    `trainer.evaluate()` run before `train()`, which the Trainer's log does not keep), else an evaluation logged at
    step 0 (`eval_on_start`). The Hub token is never read.
    """
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    peft = _peft_summary(model)
    base_model = public_model_name(finetuned_from) if finetuned_from else None
    if base_model is None and peft is not None:
        base_model = peft.get("base_model_name_or_path")
    if base_model is None:
        base_model = public_model_name(getattr(getattr(model, "config", None), "_name_or_path", None))
    if model_name is None:
        model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else None
    if model_name is None:
        model_name = Path(os.path.normpath(args.output_dir)).name
    auto_class = _auto_class(model)
    task_list = _as_list(tasks) or _as_list(PIPELINE_TAGS.get(auto_class))
    federated = _federated_callback(trainer)
    final, before, eval_step = _eval_metrics(trainer.state.log_history)
    if baseline_metrics:
        before = {
            k.removeprefix("eval_"): float(v)
            for k, v in baseline_metrics.items()
            if k.removeprefix("eval_") in final and isinstance(v, int | float)
        }
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None) if auto_class == "AutoModelForSequenceClassification" else None
    user_tags = _as_list(tags)
    card_tags = ["hf_hiso", "zeroth-order"]
    if federated is not None:
        card_tags.append("federated-learning")
    if peft is not None:
        card_tags.append("peft")
    card_tags += [t for t in user_tags if t not in card_tags]
    params = list(model.parameters())
    return _json_safe(
        {
            "model_name": model_name,
            "hub_model_id": args.hub_model_id,
            "base_model": base_model,
            "auto_class": auto_class,
            "num_labels": num_labels,
            "tasks": task_list,
            "datasets": _as_list(dataset_tags),
            "dataset_names": _as_list(dataset),
            "dataset_args": _as_list(dataset_args),
            "language": language,
            "license": license,
            "tags": card_tags,
            "library_name": "peft" if peft is not None else "transformers",
            "peft": peft,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params),
            "zo": asdict(trainer.zo_args),
            "training": {
                "learning_rate": args.learning_rate,
                "lr_scheduler_type": args.lr_scheduler_type,
                "per_device_train_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_processes": args.world_size,
                "global_step": trainer.state.global_step,
                "seed": args.seed,
            },
            "federation": federated.federation_summary() if federated is not None else None,
            "metrics": final,
            "metrics_before": before,
            "eval_step": eval_step,
            "framework_versions": framework_versions(),
        }
    )


# ---- rendering ------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _usage(inputs: dict[str, Any]) -> str:
    repo = inputs["hub_model_id"] or inputs["model_name"]
    auto = inputs["auto_class"]
    if auto == LABEL_HEAD_CLASS:
        # The folder is a stock encoder plus `classifier.safetensors` (hf_hiso.heads): transformers alone loads it.
        return "\n".join(
            [
                "import torch",
                "from huggingface_hub import hf_hub_download",
                "from safetensors.torch import load_file",
                "from transformers import AutoModel, AutoTokenizer",
                "",
                f'encoder, tokenizer = AutoModel.from_pretrained("{repo}"), AutoTokenizer.from_pretrained("{repo}")',
                f'head = load_file(hf_hub_download("{repo}", "classifier.safetensors"))  # or the local file',
                'batch = tokenizer(["some text"], return_tensors="pt", padding=True)',
                "hidden = encoder(**batch).last_hidden_state",
                'mask = batch["attention_mask"].unsqueeze(-1).float()',
                "emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling",
                'logits = 20.0 * emb @ head["weight"].T + head["bias"]  # scale: classifier_config.json',
                "# or: from hf_hiso.heads import LabelDescriptionClassifier; "
                f'LabelDescriptionClassifier.from_pretrained("{repo}")',
            ]
        )
    labels = f", num_labels={inputs['num_labels']}" if inputs.get("num_labels") else ""
    lines = [f"from transformers import {auto}, AutoTokenizer"]
    if inputs["peft"] is not None:
        base = inputs["base_model"] or "<the base model>"
        lines = [
            "from peft import PeftModel",
            *lines,
            "",
            f'base = {auto}.from_pretrained("{base}"{labels})',
            f'model = PeftModel.from_pretrained(base, "{repo}")  # the adapter and the trained head',
        ]
    else:
        lines += ["", f'model = {auto}.from_pretrained("{repo}")']
    lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo}")')
    return "\n".join(lines)


PEFT_NAMES = {"LORA": "LoRA", "IA3": "IA3", "VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA"}


def _summary(inputs: dict[str, Any]) -> str:
    what = "A PEFT adapter" if inputs["peft"] is not None else "A model"
    if inputs["peft"] is not None and inputs["peft"].get("peft_type"):
        kind = inputs["peft"]["peft_type"]
        what = f"A {PEFT_NAMES.get(kind, kind)} adapter (PEFT)"
    base = f"`{inputs['base_model']}`" if inputs["base_model"] else "a local model"
    task = f" for {inputs['tasks'][0]}" if inputs["tasks"] else ""
    data = f" on {', '.join(inputs['dataset_names'] or inputs['datasets'])}" if inputs["datasets"] else ""
    fed = inputs["federation"]
    how = f"federated over {fed['num_clients']} simulated clients" if fed else "centrally"
    text = (
        f"{what}{task}, fine-tuned from {base}{data} with **HiSo**, zeroth-order (no backpropagation), {how}, "
        f"with the `hf_hiso` library. {inputs['trainable_params']:,} of "
        f"{inputs['total_params']:,} parameters were trained."
    )
    if fed and fed.get("bytes_total"):
        text += (
            f" The whole training exchanged {format_bytes(fed['bytes_total'])} between clients and server; FedAvg "
            f"would have sent {format_bytes(fed['fedavg_bytes'])} for the same rounds ({fed['saving_factor']:,.0f}x "
            "more)."
        )
    return text


def _card_context(inputs: dict[str, Any]) -> dict[str, Any]:
    zo = inputs["zo"]
    training = inputs["training"]
    algorithm_rows = [(ZO_LABELS[k], _fmt(zo[k])) for k in ZO_LABELS if k in zo]
    # Settings without a label here (e.g. added by an extension) are still listed, under their field name.
    # The curvature extension's own settings only matter when it is on.
    hidden = {k for k in zo if k.startswith("zo_curvature_")} if not zo.get("zo_curvature") else set()
    algorithm_rows += [(f"`{k}`", _fmt(v)) for k, v in sorted(zo.items()) if k not in ZO_LABELS and k not in hidden]
    algorithm_rows += [
        ("learning rate (schedule)", f"{_fmt(training['learning_rate'])} ({training['lr_scheduler_type']})"),
        (
            "batch size per device (x accumulation)",
            f"{training['per_device_train_batch_size']} x {training['gradient_accumulation_steps']}",
        ),
        ("optimizer steps (rounds when federated)", str(training["global_step"])),
        ("trainable parameters", f"{inputs['trainable_params']:,} of {inputs['total_params']:,}"),
        ("seed", str(training["seed"])),
    ]
    peft = inputs["peft"]
    if peft is not None:
        for key in (
            "peft_type",
            "r",
            "lora_alpha",
            "target_modules",
            "layers_to_transform",
            "init_lora_weights",
            "modules_to_save",
        ):
            if key in peft:
                algorithm_rows.append((f"PEFT `{key}`", _fmt(peft[key])))
    fed = inputs["federation"]
    federation_rows: list[tuple[str, str]] = []
    communication_rows: list[tuple[str, str]] = []
    wire_format = ""
    if fed:
        federation_rows = [
            ("clients M", str(fed["num_clients"])),
            ("clients sampled per round m", str(fed["clients_per_round"])),
            ("local steps per round tau", str(fed["local_steps"])),
            (
                "partition",
                fed["partition"]
                + (
                    f" (Dirichlet alpha {_fmt(fed['dirichlet_alpha'])})"
                    if fed.get("dirichlet_alpha") is not None
                    else ""
                ),
            ),
            ("aggregation", fed.get("aggregation", "mean")),
            ("rounds run", str(fed.get("rounds", 0))),
        ]
        if fed.get("drop_rate"):
            federation_rows.append(("simulated drop rate", _fmt(fed["drop_rate"])))
        if fed.get("client_sizes"):
            federation_rows.append(("examples per client", _fmt(fed["client_sizes"])))
        wire = fed.get("wire_format") or {}
        wire_format = (
            f"{wire.get('bytes_per_scalar', 4)}-byte scalars, {wire.get('bytes_per_seed', 8)}-byte seeds, "
            f"{wire.get('bytes_per_param', 4)}-byte parameters for FedAvg"
        )
        communication_rows = [
            ("uplink (clients to server: scalars)", format_bytes(fed.get("bytes_uplink", 0))),
            ("downlink (server to clients: seeds, catch-up)", format_bytes(fed.get("bytes_downlink", 0))),
            ("**total**", f"**{format_bytes(fed.get('bytes_total', 0))}**"),
            ("FedAvg for the same rounds (weights down and up)", format_bytes(fed.get("fedavg_bytes", 0))),
            ("saving factor (FedAvg / HiSo)", f"{fed.get('saving_factor', 0.0):,.0f}x"),
            ("paper convention (P scalars each way, seeds not counted)", format_bytes(fed.get("paper_bytes", 0))),
        ]
    before, final = inputs["metrics_before"], inputs["metrics"]
    metric_rows = [(name, _fmt(before[name]) if name in before else "", _fmt(value)) for name, value in final.items()]
    processes = training["num_processes"]
    return {
        "model_name": inputs["model_name"],
        "summary": _summary(inputs),
        "usage": _usage(inputs),
        "algorithm_rows": algorithm_rows,
        "federation": bool(fed),
        "federation_rows": federation_rows,
        "communication_rows": communication_rows,
        "wire_format": wire_format,
        "processes": "one process" if processes == 1 else f"{processes} data-parallel processes",
        "metric_rows": metric_rows,
        "has_before": bool(before),
        "eval_dataset": ", ".join(inputs["dataset_names"] or inputs["datasets"]) or "the evaluation set",
        "eval_step": inputs["eval_step"],
        "framework_versions": sorted(inputs["framework_versions"].items()),
        "citation": HISO_CITATION,
    }


def _card_data(inputs: dict[str, Any]) -> ModelCardData:
    eval_results = None
    if inputs["metrics"] and inputs["datasets"] and inputs["tasks"]:
        dataset_name = (inputs["dataset_names"] or inputs["datasets"])[0]
        dataset_config = inputs["dataset_args"][0] if inputs["dataset_args"] else None
        eval_results = [
            EvalResult(
                task_type=inputs["tasks"][0],
                dataset_type=inputs["datasets"][0],
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                dataset_split="validation",
                metric_type=name,
                metric_name=name,
                metric_value=round(value, 6),
            )
            for name, value in inputs["metrics"].items()
            if name != "loss"
        ] or None
    return ModelCardData(
        base_model=inputs["base_model"],
        datasets=inputs["datasets"] or None,
        language=inputs["language"],
        license=inputs["license"],
        library_name=inputs["library_name"],
        pipeline_tag=inputs["tasks"][0] if inputs["tasks"] else None,
        tags=inputs["tags"],
        model_name=inputs["model_name"],
        eval_results=eval_results,
    )


def render_model_card(inputs: dict[str, Any], template: str | os.PathLike[str] | None = None) -> ModelCard:
    """Renders the card for `inputs` (from [`model_card_inputs`]) with the shipped template (or `template`).

    Returns:
        `huggingface_hub.ModelCard`: `str(card)` is the `README.md` text; `card.data` the front matter.
    """
    return ModelCard.from_template(
        _card_data(inputs), template_path=str(template or template_path()), card=_card_context(inputs)
    )


def write_model_card(inputs: dict[str, Any], folder: str | os.PathLike[str]) -> Path:
    """Writes `README.md` (the rendered card) and `hiso_card.json` (its inputs) into `folder`; returns the card."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Rendered from the JSON round trip, so that the stored inputs re-render to exactly this card.
    inputs = json.loads(json.dumps(inputs, sort_keys=True))
    card = render_model_card(inputs)
    path = folder / "README.md"
    path.write_text(str(card), encoding="utf-8")
    (folder / CARD_INPUTS_NAME).write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def write_trainer_model_card(trainer: HiSoTrainer, folder: str | os.PathLike[str], **card_kwargs: Any) -> None:
    """Writes `trainer`'s card into `folder` on the process that saves. Keyword arguments (those of
    `Trainer.create_model_card`) are remembered, so that the cards of later saves and checkpoints keep them."""
    remembered = dict(getattr(trainer, "_hiso_card_kwargs", {}))
    remembered.update({k: v for k, v in card_kwargs.items() if v is not None})
    trainer._hiso_card_kwargs = remembered
    if not trainer.args.should_save:
        return
    write_model_card(model_card_inputs(trainer, **remembered), folder)


def rerender(folders: list[str | os.PathLike[str]]) -> list[Path]:
    """Re-renders `README.md` from the stored `hiso_card.json` in each folder (after a template change)."""
    written = []
    for folder in folders:
        inputs = json.loads((Path(folder) / CARD_INPUTS_NAME).read_text(encoding="utf-8"))
        written.append(write_model_card(inputs, folder))
    return written


if __name__ == "__main__":
    import sys

    rerender(sys.argv[1:])
