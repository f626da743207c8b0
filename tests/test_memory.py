"""The memory plan (magr.pipeline.memory): the method's working set is the measured one, checked before use."""
from __future__ import annotations

import pytest

from magr.core.methods import PRESETS
from magr.pipeline.memory import (
    LLAMA2,
    WORKING_SET,
    streaming_memory,
    working_set_bytes,
)


def test_every_method_has_a_working_set():
    assert set(WORKING_SET) == set(PRESETS)


def test_working_set_is_the_largest_group_with_the_method_coefficients():
    s = LLAMA2["70B"]
    h, f = s.hidden, s.intermediate
    a, b = WORKING_SET["magr+optq"]
    down, gate_up = 4 * (a * h * f + b * f * f), 4 * (a * 2 * h * f + b * h * h)
    assert working_set_bytes(s, "magr+optq") == max(down, gate_up)
    assert working_set_bytes(s, "rtn") < working_set_bytes(s, "optq") < working_set_bytes(s, "magr+optq")
    assert streaming_memory(s)["device"] > streaming_memory(s, method="optq")["device"]  # the paper's method: default


def test_unknown_method_is_refused_naming_the_allowed():
    with pytest.raises(ValueError, match=r"'gptq'.*magr\+optq"):
        streaming_memory(LLAMA2["7B"], method="gptq")
