"""`FederatedArguments`: the federation's settings as `HfArgumentParser` arguments, checked on parsing, and the
`FederatedZOCallback` they build."""

import inspect
from dataclasses import field, fields, make_dataclass

import pytest
from transformers import HfArgumentParser

from hf_hiso import FederatedZOCallback, HiSoConfig
from hf_hiso.federated import FederatedArguments


def parse(argv: list[str], cls: type = FederatedArguments):
    (args,) = HfArgumentParser((cls,)).parse_args_into_dataclasses(args=argv)
    return args


def test_parses_beside_hiso_config_and_builds_the_callback(tmp_path):
    argv = [
        "--num_clients", "5", "--clients_per_round", "3", "--local_steps", "2", "--partition", "iid",
        "--dirichlet_alpha", "0.5", "--drop_rate", "0.25", "--aggregation", "median",
        "--output_dir", str(tmp_path), "--zo_num_directions", "3",
    ]  # fmt: skip
    fed_args, training_args = HfArgumentParser((FederatedArguments, HiSoConfig)).parse_args_into_dataclasses(args=argv)
    assert training_args.zo_num_directions == 3
    callback = fed_args.build_callback(label_column="label", seed=7)
    assert isinstance(callback, FederatedZOCallback)
    for f in fields(FederatedArguments):
        assert getattr(callback, f.name) == getattr(fed_args, f.name), f.name
    assert (callback.num_clients, callback.aggregation, callback.drop_rate) == (5, "median", 0.25)
    assert callback.label_column == "label" and callback.seed == 7


def test_defaults_are_those_of_the_callback():
    defaults = inspect.signature(FederatedZOCallback.__init__).parameters
    args = parse([])
    for f in fields(FederatedArguments):
        assert getattr(args, f.name) == defaults[f.name].default, f.name
    # The same from a JSON / dict configuration.
    (from_dict,) = HfArgumentParser((FederatedArguments,)).parse_dict({})
    assert from_dict == args


def test_zero_clients_means_centralized():
    args = parse(["--num_clients", "0", "--clients_per_round", "4"])
    assert not args.enabled and args.build_callback(label_column="label") is None


@pytest.mark.parametrize(
    "values, name",
    [
        ({"num_clients": -1}, "num_clients"),
        ({"num_clients": 2, "clients_per_round": 3}, "clients_per_round"),
        ({"local_steps": 0}, "local_steps"),
        ({"partition": "column"}, "partition"),
        ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"aggregation": "max"}, "aggregation"),
    ],
)
def test_bad_values_fail_on_construction_naming_the_field(values, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        FederatedArguments(**values)


def test_bad_values_fail_while_parsing():
    with pytest.raises(ValueError, match="`clients_per_round`"):
        parse(["--num_clients", "2", "--clients_per_round", "3"])
    with pytest.raises(SystemExit):  # argparse's own error for a value outside `choices`
        parse(["--aggregation", "max"])


def test_a_subclass_can_put_the_federation_behind_a_switch():
    # What run_prompt_lm.py does with its `--federated` flag: a field of its own, and `enabled` reading it.
    switched = make_dataclass(
        "SwitchedArguments",
        [("federated", bool, field(default=False))],
        bases=(FederatedArguments,),
        namespace={"enabled": property(lambda self: self.federated)},
    )
    off = parse(["--clients_per_round", "9"], switched)  # not checked: no federation is asked for
    assert off.build_callback() is None
    on = parse(["--federated", "--num_clients", "3"], switched)
    assert on.build_callback().num_clients == 3
    with pytest.raises(ValueError, match="`num_clients`"):
        parse(["--federated", "--num_clients", "0"], switched)
