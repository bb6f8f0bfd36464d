"""`bench.decode_profile` on CPU: a tiny model's decode step profiled for each FFN kind, its
largest operators listed in order, within the sum, and bad arguments refused clearly."""

from __future__ import annotations

import json

import pytest

from moc_lightning.bench import decode_profile


def test_profiles_each_kind_largest_first(tmp_path, monkeypatch):
    # the plain MoC path on CPU: other test modules turn the Triton interpreter on, which would
    # send the MoC step through the (slow, interpreted) decode kernel
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    path = tmp_path / "profile.jsonl"
    assert decode_profile.main(["--model", "llama-tiny", "--prompt", "8", "--steps", "2", "--top", "3",
                                "--out", str(path)]) == 0
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["kind"] for r in records} == {"swiglu", "moc", "moc_2:8"}
    for kind in ("swiglu", "moc", "moc_2:8"):
        mine = {r["name"]: r for r in records if r["kind"] == kind and not r["name"].endswith("/kernel")}
        assert mine[f"{kind}/wall_per_step"]["value"] > 0
        total = mine[f"{kind}/sum_per_step"]
        assert total["value"] > 0 and total["launches"] >= 1
        listed = [r for r in records if r["name"] == f"{kind}/kernel"]
        assert len(listed) == 3 and all(r["launches"] > 0 for r in listed)
        times = [r["value"] for r in listed]
        assert times == sorted(times, reverse=True) and sum(times) <= total["value"] + 1e-6
    # the MoC model's step runs its FFN (the plain path on CPU), which the dense one has not
    moc_ops = {r["kernel"] for r in records if r["kind"] == "moc" and r["name"] == "moc/kernel"}
    assert "MoCFunction" in moc_ops


@pytest.mark.parametrize("argv, message", [(["--model", "llama-nope"], "--model must be one of"),
                                           (["--steps", "0"], "must be at least 1")])
def test_bad_arguments_are_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        decode_profile.main(argv)
