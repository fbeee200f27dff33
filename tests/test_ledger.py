import json

import pytest

from hf_hiso.federated import CommunicationLedger, RoundCost, WireFormat


@pytest.mark.parametrize(
    ("num_sampled", "P", "tau"),
    [(1, 1, 1), (2, 5, 1), (3, 5, 4), (6, 20, 2)],
)
def test_round_bytes_match_formulas(num_sampled, P, tau):
    d = 1000
    ledger = CommunicationLedger(num_trainable_params=d, num_directions=P, local_steps=tau)
    clients = list(range(num_sampled))
    cost = ledger.record_round(0, clients, {})
    # Uplink: tau * P float32 scalars per client; downlink: tau 64-bit seeds per client.
    assert cost.bytes_uplink == num_sampled * tau * P * 4
    assert cost.bytes_downlink == num_sampled * tau * 8
    assert cost.bytes_catchup == 0
    assert cost.bytes_total == cost.bytes_uplink + cost.bytes_downlink
    assert cost.fedavg_bytes == num_sampled * 2 * d * 4
    assert cost.paper_bytes == num_sampled * 2 * tau * P * 4

    ledger.record_round(1, clients, {})
    assert ledger.rounds == 2
    assert ledger.bytes_uplink_total == 2 * cost.bytes_uplink
    assert ledger.bytes_downlink_total == 2 * cost.bytes_downlink
    assert ledger.bytes_total == 2 * cost.bytes_total
    assert ledger.fedavg_bytes_total == 2 * num_sampled * 2 * d * 4
    assert ledger.saving_factor == pytest.approx((2 * d * 4) / (tau * P * 4 + tau * 8))


def test_paper_convention_40_bytes():
    ledger = CommunicationLedger(num_trainable_params=125_000_000, num_directions=5, local_steps=1)
    cost = ledger.record_round(0, [0, 4], {})
    assert cost.paper_bytes == 2 * 40
    assert ledger.paper_bytes_per_client == 40
    for r in range(1, 10):
        ledger.record_round(r, [1, 2], {})
    assert ledger.paper_bytes_total == 10 * 2 * 40


def test_paper_convention_ignores_wire_format_and_catchup():
    ledger = CommunicationLedger(
        num_trainable_params=10, num_directions=5, local_steps=1, wire=WireFormat(bytes_per_scalar=2)
    )
    cost = ledger.record_round(0, [0], {0: 7})
    assert cost.paper_bytes == 40


def test_catchup_bytes():
    d, P, tau = 50, 3, 2
    ledger = CommunicationLedger(num_trainable_params=d, num_directions=P, local_steps=tau)
    # Client 0 missed 4 rounds, client 2 none, client 5 (not sampled) is ignored.
    cost = ledger.record_round(7, [0, 2], {0: 4, 2: 0, 5: 100})
    per_missed = tau * 8 + tau * P * 4
    assert cost.bytes_catchup == 4 * per_missed
    assert cost.bytes_downlink == 2 * tau * 8 + 4 * per_missed
    assert cost.bytes_uplink == 2 * tau * P * 4
    assert ledger.bytes_catchup_total == 4 * per_missed


def test_catchup_with_two_scalars_per_direction():
    P, tau = 5, 3
    ledger = CommunicationLedger(num_trainable_params=10, num_directions=P, local_steps=tau, scalars_per_direction=2)
    cost = ledger.record_round(0, [1, 2, 3], {1: 2, 3: 1})
    assert cost.bytes_uplink == 3 * tau * P * 2 * 4
    assert cost.bytes_downlink == 3 * tau * 8 + 3 * (tau * 8 + tau * P * 2 * 4)
    assert cost.paper_bytes == 3 * 2 * tau * P * 2 * 4


def test_curvature_steps_count_the_second_scalar_only_where_it_is_sent():
    """With `curvature_every > 1` a round carries `P * (tau + k)` scalars for `k` curvature steps (S = 2): on the
    uplink, in the paper's convention, and in the catch-up of a client that missed it, also after a resume."""
    P, tau, b = 5, 2, 4
    ledger = CommunicationLedger(num_trainable_params=10, num_directions=P, local_steps=tau, scalars_per_direction=2)
    assert ledger.scalars_in_round(None) == ledger.scalars_in_round(tau) == tau * P * 2
    r0 = ledger.record_round(0, [0], curvature_steps=1)
    assert r0.bytes_uplink == P * (tau + 1) * b and r0.paper_bytes == 2 * P * (tau + 1) * 4
    r1 = ledger.record_round(1, [0], curvature_steps=0)
    assert r1.bytes_uplink == P * tau * b
    resumed = CommunicationLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
    for led in (ledger, resumed):
        # client 1 missed rounds 0 and 1 (one and no curvature step), client 0 none; round 2 has both.
        cost = led.record_round(2, [0, 1], {1: 2}, curvature_steps=tau)
        assert cost.bytes_catchup == 2 * tau * 8 + (P * (tau + 1) + P * tau) * b
        assert cost.bytes_uplink == 2 * tau * P * 2 * b
    assert resumed.summary() == ledger.summary()
    # missing rounds 0 to 2: round 2 had curvature on every step, so its catch-up carries the full S
    cost = ledger.record_round(3, [1], {1: 3}, curvature_steps=0)
    assert cost.bytes_catchup == 3 * tau * 8 + (P * tau + P * (tau + 1) + tau * P * 2) * b
    with pytest.raises(ValueError, match="curvature_steps"):
        ledger.record_round(4, [0], curvature_steps=tau + 1)


def test_custom_wire_format():
    wire = WireFormat(bytes_per_scalar=2, bytes_per_seed=4, bytes_per_param=2)
    ledger = CommunicationLedger(num_trainable_params=100, num_directions=4, local_steps=2, wire=wire)
    cost = ledger.record_round(0, [0], {0: 1})
    assert cost.bytes_uplink == 2 * 4 * 2
    assert cost.bytes_downlink == 2 * 4 + (2 * 4 + 2 * 4 * 2)
    assert cost.fedavg_bytes == 2 * 100 * 2


def test_dropped_clients_count_downlink_only():
    d, P, tau = 100, 5, 1
    ledger = CommunicationLedger(num_trainable_params=d, num_directions=P, local_steps=tau)
    cost = ledger.record_round(0, [0], {1: 2}, dropped=[1])
    assert cost.num_sampled == 2 and cost.num_reported == 1
    assert cost.bytes_uplink == 1 * tau * P * 4
    assert cost.bytes_downlink == 2 * tau * 8 + 2 * (tau * 8 + tau * P * 4)
    # FedAvg: both download the model, only the reporting client uploads it.
    assert cost.fedavg_bytes == 3 * d * 4
    assert cost.paper_bytes == 3 * tau * P * 4


def test_log_dict_keys_and_values():
    ledger = CommunicationLedger(num_trainable_params=1000, num_directions=5, local_steps=1)
    empty = ledger.log_dict()
    assert empty["fed/round"] == 0.0 and empty["fed/saving_factor"] == 0.0
    ledger.record_round(0, [0, 1], {})
    ledger.record_round(1, [2, 3], {2: 1})
    logs = ledger.log_dict()
    expected_keys = {
        "fed/round",
        "fed/bytes_uplink_round",
        "fed/bytes_uplink_total",
        "fed/bytes_downlink_round",
        "fed/bytes_downlink_total",
        "fed/bytes_round",
        "fed/bytes_total",
        "fed/fedavg_bytes_round",
        "fed/fedavg_bytes_total",
        "fed/paper_bytes_round",
        "fed/paper_bytes_total",
        "fed/saving_factor",
    }
    assert set(logs) == expected_keys
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["fed/round"] == 2.0
    assert logs["fed/bytes_uplink_round"] == 2 * 5 * 4
    assert logs["fed/bytes_downlink_round"] == 2 * 8 + (8 + 5 * 4)
    assert logs["fed/bytes_uplink_total"] == 4 * 5 * 4
    assert logs["fed/bytes_downlink_total"] == 4 * 8 + (8 + 5 * 4)
    assert logs["fed/bytes_total"] == logs["fed/bytes_uplink_total"] + logs["fed/bytes_downlink_total"]
    assert logs["fed/fedavg_bytes_total"] == 4 * 2 * 1000 * 4
    assert logs["fed/paper_bytes_total"] == 4 * 40
    assert logs["fed/saving_factor"] == pytest.approx(logs["fed/fedavg_bytes_total"] / logs["fed/bytes_total"])
    assert set(ledger.log_dict(prefix="comm/")) == {k.replace("fed/", "comm/") for k in expected_keys}


def test_summary_is_json_able():
    ledger = CommunicationLedger(num_trainable_params=10, num_directions=2, local_steps=1)
    ledger.record_round(0, [0], {})
    summary = json.loads(json.dumps(ledger.summary()))
    assert summary["rounds"] == 1
    assert summary["bytes_total"] == 2 * 4 + 8
    assert summary["wire_format"] == {"bytes_per_scalar": 4, "bytes_per_seed": 8, "bytes_per_param": 4}


def test_state_dict_round_trip_continues_totals():
    kwargs = {"num_trainable_params": 321, "num_directions": 3, "local_steps": 2, "scalars_per_direction": 2}
    plan = [([0, 1], {0: 0}, []), ([2], {2: 1}, [3]), ([1, 4], {1: 2, 4: 3}, []), ([0], {0: 2}, [1])]

    reference = CommunicationLedger(**kwargs)
    for r, (participants, missed, dropped) in enumerate(plan):
        reference.record_round(r, participants, missed, dropped=dropped)

    first = CommunicationLedger(**kwargs)
    for r, (participants, missed, dropped) in enumerate(plan[:2]):
        first.record_round(r, participants, missed, dropped=dropped)
    state = json.loads(json.dumps(first.state_dict()))

    resumed = CommunicationLedger(**kwargs)
    resumed.load_state_dict(state)
    assert resumed == first
    with pytest.raises(ValueError, match="`round_idx`"):
        resumed.record_round(1, [0], {})
    for r, (participants, missed, dropped) in enumerate(plan[2:], start=2):
        resumed.record_round(r, participants, missed, dropped=dropped)
    assert resumed == reference
    assert resumed.summary() == reference.summary()
    assert CommunicationLedger.from_state_dict(reference.state_dict()) == reference


def test_load_state_dict_rejects_other_configuration():
    state = CommunicationLedger(num_trainable_params=10, num_directions=5, local_steps=1).state_dict()
    other = CommunicationLedger(num_trainable_params=10, num_directions=4, local_steps=1)
    with pytest.raises(ValueError, match="num_directions: saved 5, now 4"):
        other.load_state_dict(state)


def test_round_cost_to_dict():
    cost = RoundCost(0, 2, 1, 20, 30, 5, 100, 40)
    assert cost.to_dict()["bytes_total"] == 50


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_directions": 0}, "num_directions"),
        ({"local_steps": 0}, "local_steps"),
        ({"num_trainable_params": -1}, "num_trainable_params"),
        ({"scalars_per_direction": 0}, "scalars_per_direction"),
    ],
)
def test_constructor_errors(kwargs, field):
    args = {"num_trainable_params": 10, "num_directions": 5, "local_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=f"`{field}`"):
        CommunicationLedger(**args)


def test_wire_format_errors():
    with pytest.raises(ValueError, match="`bytes_per_seed`"):
        WireFormat(bytes_per_seed=-8)


def test_record_round_errors():
    ledger = CommunicationLedger(num_trainable_params=10, num_directions=5, local_steps=1)
    with pytest.raises(ValueError, match="`participants`"):
        ledger.record_round(0, [1, 1], {})
    with pytest.raises(ValueError, match="`participants` and `dropped`"):
        ledger.record_round(0, [1], {}, dropped=[1])
    with pytest.raises(ValueError, match="`missed_rounds"):
        ledger.record_round(0, [1], {1: -1})
    with pytest.raises(ValueError, match="`round_idx`"):
        ledger.record_round(-1, [1], {})
    assert ledger.rounds == 0  # failed calls count nothing
