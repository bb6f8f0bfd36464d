"""`moc generate` on a checkpoint that a very short `moc train` wrote, on CPU, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from moc_lightning.cli.main import main

TRAIN = ["model=llama-tiny", "trainer.max_steps=2", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "trainer.monitor_every_n_steps=1", "trainer.checkpoint_every_n_steps=2",
         "trainer.progress_bar=false", "data.seq_len=32", "data.batch_size=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("generate")
    code = main(["train", *TRAIN, f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", f"run_dir={tmp}/runs",
                 f"data.cache_dir={tmp}/cache"])
    assert code == 0
    (found,) = (tmp / "runs").glob("*/*/checkpoints/last.ckpt")
    return found.parent.parent


def generated(capsys, *args: str) -> str:
    code = main(["generate", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_generate_from_run_folder_and_checkpoint_file(run_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    greedy = generated(capsys, str(run_dir), "--prompt", "The river", "--max-new-tokens", "6", "--greedy")
    same = generated(capsys, str(run_dir / "checkpoints" / "last.ckpt"), "--prompt", "The river",
                     "--max-new-tokens", "6", "--greedy", "--device", "cpu")
    assert greedy == same and greedy.endswith("\n")
    sampled = [generated(capsys, str(run_dir), "--prompt", "", "--max-new-tokens", "6", "--temperature", "0.8",
                         "--top-p", "0.9", "--seed", "5") for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed fixes the sample


def test_generated_text_is_the_models_greedy_continuation(run_dir, monkeypatch):
    """The command's text is the decoded greedy tokens of the checkpoint's model and tokenizer."""
    import argparse

    from moc_lightning.cli import generate as cli
    from moc_lightning.inference import generate

    path = cli.find_checkpoint(str(run_dir))
    ckpt = cli.load_checkpoint(path)
    model = cli.build_model(ckpt, path).eval()
    tokenizer = cli.load_run_tokenizer(ckpt, path, None)
    ids = tokenizer.encode("Once upon")[:-1]
    expected = tokenizer.decode(generate(model, [ids], max_new_tokens=5, stop_tokens=[tokenizer.eos_id]).tokens[0])
    args = argparse.Namespace(checkpoint=str(run_dir), prompt="Once upon", max_new_tokens=5, greedy=True,
                              temperature=1.0, top_p=1.0, seed=0, device="cpu", tokenizer=None, decode_kernel=True,
                              cuda_graph=False)
    assert cli.run_generate(args) == expected


@pytest.mark.parametrize(
    "args, words",
    [
        (["/nonexistent/run"], ["no such checkpoint", "/nonexistent/run"]),
        (["{tmp}"], ["holds no checkpoint", "checkpoints/last.ckpt"]),
        (["{tmp}/bad.ckpt"], ["cannot read the checkpoint", "bad.ckpt"]),
        (["{run}", "--top-p", "0"], ["--top-p"]),
        (["{run}", "--temperature", "0"], ["--temperature"]),
        (["{run}", "--cuda-graph", "--device", "cpu"], ["--cuda-graph needs a CUDA device", "cpu"]),
    ],
)
def test_errors_are_one_clear_paragraph(run_dir, tmp_path, capsys, args, words):
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    code = main(["generate", *args, "--prompt", "x"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert err.startswith("moc generate: error:") and "Traceback" not in err
    for word in words:
        assert word in err
