"""`moc_lightning.bench.sass`: the Triton kernels compiled to sm_90 SASS on the CPU. The row
Top-K's placement must keep its layout (no shared-memory round trip: stop 13 found Triton 3.6
inserting one around `tl.store`, about 40 instructions a chunk), the bitmask kernels must read and
write their dense tiles 16 bytes a thread, and the decode up/down kernel must not spill."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from moc_lightning.bench.sass import opcode_counts, wide_accesses

SASS_SNIPPET = """
        /*0a10*/                   HSET2.BF16_V2.GE.AND R5, R36, R4.reuse, PT ;   /* 0x... */
        /*0a20*/               @P4 STG.E.U16 desc[UR12][R10.64], R5 ;
        /*0a30*/              @!P5 BRA `(.L_x_1) ;
        /*0a40*/                   REDUX.SUM.S32 UR10, R5 ;
        /*0a50*/                   HSET2.BF16_V2.EQ.AND R6, R37, R4, PT ;
.L_x_1:
"""


def test_opcode_counts_drop_predicates_and_modifiers():
    assert opcode_counts(SASS_SNIPPET) == {"HSET2": 2, "STG": 1, "BRA": 1, "REDUX": 1}


def test_wide_accesses_count_16_byte_loads_and_stores_only():
    sass = SASS_SNIPPET + """
        /*0b00*/              @P1 LDG.E.128 R20, desc[UR12][R16.64] ;
        /*0b10*/                  STG.E.128 desc[UR12][R18.64], R24 ;
        /*0b20*/              @P2 LDG.E.64 R20, desc[UR12][R16.64] ;
"""
    assert wide_accesses(sass) == 2


def _run_sass(*args: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """The command in a fresh process: triton compiles for a GPU target only if it was not first
    imported under TRITON_INTERPRET=1, as the kernel tests of this process import it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "moc_lightning.bench.sass", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _records(*args: str) -> dict[tuple[str, str], dict]:
    result = _run_sass(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return {(r["kernel"], r["name"]): r for r in map(json.loads, result.stdout.splitlines())}


def test_row_topk_compiles_for_sm90_without_shared_memory_round_trips():
    records = _records("--kernel", "row_topk", "--kernel", "row_topk_mask")
    for kernel in ("row_topk", "row_topk_mask"):
        code = records[kernel, "sass_instructions"]
        assert code["target"] == "sm_90"
        assert code["top"]["HSET2"] > 0  # the packed bf16x2 compares are in
        assert code["value"] > 100
        shared = records[kernel, "sass_shared_memory_ops"]
        assert shared["value"] == 0, f"{kernel}: layout conversions through shared memory: {shared['ops']}"
    # The mask needs no slots: no scan, fewer instructions than the index placement.
    assert records["row_topk_mask", "sass_instructions"]["value"] < records["row_topk", "sass_instructions"]["value"]


def test_mask_kernels_access_dense_tiles_16_bytes_a_thread():
    records = _records("--kernel", "mask_forward", "--kernel", "mask_backward")
    # Forward: G and U read, Z' written; backward: grad_Z read, [Z' | grad_G' | grad_U'] written.
    assert records["mask_forward", "sass_16_byte_accesses"]["value"] >= 3
    assert records["mask_backward", "sass_16_byte_accesses"]["value"] >= 4


def test_decode_updown_loads_whole_rows_16_bytes_a_thread_without_spilling():
    """Batch 1's up/down kernel (16 slots of whole 2048-wide rows, 4 warps): each slot's up and
    down row is read 16 bytes at a time (2 x 16 slots x 2 vectors a thread), and nothing spills:
    the tiles take ~250 registers, a spill would put local memory in the row loop."""
    records = _records("--kernel", "decode_updown")
    assert records["decode_updown", "sass_instructions"]["target"] == "sm_90"
    assert records["decode_updown", "sass_16_byte_accesses"]["value"] >= 64
    spills = records["decode_updown", "sass_local_memory_ops"]
    assert spills["value"] == 0, spills["ops"]


def test_decode_updown_batch2_holds_two_tokens_without_spilling():
    """Batch 2's up/down kernel (4 slots of whole rows, a token at a time, the partial of both
    tokens in registers, 4 warps, the rounds pipelined two deep): the rows read 16 bytes at a time
    (the pipelined rounds' copies into shared memory, 2 x 4 slots x 2 vectors a thread, and the
    first round's loads) and nothing spills. Its first form, a (tokens, rows, 2048) product,
    spilled hundreds of bytes a thread."""
    records = _records("--kernel", "decode_updown_batch2")
    assert records["decode_updown_batch2", "sass_16_byte_accesses"]["value"] >= 32
    spills = records["decode_updown_batch2", "sass_local_memory_ops"]
    assert spills["value"] == 0, spills["ops"]


def test_decode_attention_step_reads_its_cache_tiles_16_bytes_a_thread_without_spilling():
    """The llama-1b step's split kernel (one warp, 16 slots of 64 bf16 a tile): the k and v tiles,
    2 KB each, are 4 16-byte loads a thread each, and nothing spills."""
    records = _records("--kernel", "decode_attention_step")
    assert records["decode_attention_step", "sass_16_byte_accesses"]["value"] >= 8
    spills = records["decode_attention_step", "sass_local_memory_ops"]
    assert spills["value"] == 0, spills["ops"]


def test_sass_refuses_the_interpreter_in_one_line():
    result = _run_sass("--kernel", "row_topk", interpret=True)
    assert result.returncode == 1
    assert "unset TRITON_INTERPRET" in result.stderr
    assert "Traceback" not in result.stderr
