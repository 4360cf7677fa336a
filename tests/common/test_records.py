from __future__ import annotations

import numpy as np
import torch

from fedtune.common import records


def test_array_record_round_trip_keeps_names_order_values() -> None:
    state = {"b.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4),
             "head.bias": torch.arange(3, dtype=torch.float32)}
    rec = records.to_record(state)
    back = records.from_record(rec)
    assert list(back) == list(state)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
    back["head.bias"] += 1  # writable copy, the record is untouched
    assert np.array_equal(rec["head.bias"].numpy(), np.arange(3, dtype=np.float32))


def test_payload_bytes_equal_parameter_bytes() -> None:
    state = {"x": torch.zeros(10, 3), "y": torch.zeros(7, dtype=torch.float16)}
    rec = records.to_record(state)
    assert records.payload_bytes(rec) == 10 * 3 * 4 + 7 * 2
    assert records.wire_bytes(rec) >= records.payload_bytes(rec)
