"""Values a hostile or unlucky person gives the commands end in a usage message (exit 2), never a traceback."""

from __future__ import annotations

import pytest
from conftest import run_cli


@pytest.mark.parametrize("args, says", [
    (["--temperature", "1e-320"], "outside 0.001..100; give 0 for greedy decoding"),
    (["--temperature", "1e9"], "outside 0.001..100"),
    (["--temperature", "nan"], "is below 0"),
    (["--temperature", "0.7", "--seed", "1180591620717411303424"], "less than or equal to 9223372036854775807"),
    (["--temperature", "0.7", "--seed", "-1"], "--seed"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_sampling_values_out_of_range_are_usage_errors(workspace, command, args, says):
    """Refused before anything loads: a temperature whose division overflows, a seed beyond 64 bits."""
    argv = [command, "q", *args] if command == "generate" else [command, *args]
    r = run_cli(workspace(), *argv, subprocess_=True)  # the real command line prints the message on one line
    assert r.code == 2, r.out + r.err
    assert says in r.out + r.err and "Traceback" not in r.out + r.err
