"""`bench.decode_phases` (GPU timestamps in a copy of the decode kernels): the copy is built from
the kernel module's current source, and the stamps are summarised right. The timing itself needs
a GPU (the interpreter runs no inline PTX)."""

from __future__ import annotations

import ast

import pytest
import torch

from moc_lightning.bench import decode_phases


def test_instrumented_copy_builds_from_the_current_kernels():
    src = decode_phases.instrumented_source()
    ast.parse(src)
    # the kernels' stamps: start, slots and rows_done in the up/down kernel, cut after its
    # threshold, top and threshold inside the select (switched off in the select launch)
    assert src.count("_stamp(stamp_ptr, ") == 4 and src.count("_stamp(STAMP_PTR, ") == 2
    assert "_row_threshold(thr_ptr, False, " in src and "_row_threshold(stamp_ptr, True, " in src
    module = decode_phases.load_instrumented()
    assert hasattr(module, "_stamp") and module.STAMPS is None


def test_a_moved_anchor_is_reported(monkeypatch):
    monkeypatch.setattr(decode_phases, "_EDITS", decode_phases._EDITS + (("no such line\n", ""),))
    with pytest.raises(RuntimeError, match="occurs 0 times"):
        decode_phases.instrumented_source()


def test_phase_times_are_microseconds_after_the_first_start():
    stamps = torch.zeros(4, 8, dtype=torch.int64)
    stamps[:3, 0] = torch.tensor([10_000, 10_500, 11_000])  # program 3 never ran (a spare slot)
    stamps[:3, 4] = torch.tensor([14_000, 17_000, 13_000])
    stamps[1, 3] = 12_000
    times = decode_phases.phase_times(stamps)
    assert times["start"] == [0.0, 0.5, 1.0]
    assert times["rows_done"] == [3.0, 4.0, 7.0]
    assert times["cut"] == [2.0, 2.0, 2.0]
    assert "top" not in times


@pytest.mark.parametrize("config", ["{not json", '{"updown_rowz": 8}', '{"updown_block_c": 4}'])
def test_a_bad_config_is_refused_with_a_message(config):
    with pytest.raises(SystemExit, match="--config must be a JSON object of LaunchConfig fields"):
        decode_phases.main(["--config", config])
