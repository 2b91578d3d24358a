"""The protocol with Rust, against its golden copy (``protocol.json``), which the Rust tests
read too: a field renamed, added or dropped here fails this test; on the Rust side, theirs."""

import json

import pytest
from pensieve_bridge import protocol
from pensieve_bridge.protocol import AddParams


def test_the_bridge_speaks_the_golden_protocol():
    golden = protocol.golden()
    assert {k: golden[k] for k in ("version", "codes", "records")} == protocol.schema()


def test_the_golden_example_is_what_the_bridge_takes():
    example = protocol.golden()["examples"]["AddParams"]
    assert AddParams.from_json(json.dumps(example)).max_tokens == example["max_tokens"]


def test_a_missing_or_unknown_field_is_named():
    example = dict(protocol.golden()["examples"]["AddParams"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        AddParams.from_json(json.dumps({**example, "temprature": 1}))
    del example["stop"]
    with pytest.raises(TypeError, match="stop"):
        AddParams.from_json(json.dumps(example))


def test_records_are_tuples_here_and_named_for_rust():
    r = protocol.AddResult(protocol.Added.STARTED, 3, 10, 4, "", "")
    code, uid, *_ = r
    assert (code, uid, r.cached_tokens) == (0, 3, 4)
