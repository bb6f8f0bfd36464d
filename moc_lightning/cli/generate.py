"""`moc generate`: continue a prompt with a model trained by `moc train`.

The checkpoint is a Lightning checkpoint (a .ckpt file, or a run folder whose checkpoints/last.ckpt
is taken). The model is rebuilt from its hyperparameters, the tokenizer from the data config the
run recorded (in the checkpoint, else the run folder's config.yaml), and checked against the
tokenizer identity the checkpoint saved, so token ids mean what they meant in training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import yaml

from moc_lightning.models import ModelConfig, MoCTransformer

MODEL_PREFIX = "model."


def add_generate_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "generate",
        help="continue a prompt with a trained checkpoint",
        description="Load a checkpoint written by `moc train` and print the continuation of --prompt.",
        epilog="examples:\n  moc generate runs/llama-small_on_embedded/<run> --prompt 'The river'\n"
               "  moc generate path/to/last.ckpt --prompt 'Once' --temperature 0.8 --top-p 0.9 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a .ckpt file, or a run folder (its checkpoints/last.ckpt is used)")
    parser.add_argument("--prompt", required=True, help="the text to continue ('' starts a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--greedy", action="store_true", help="take the most likely token each step")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:i]")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the one the run recorded")
    parser.add_argument("--decode-kernel", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, run the decode steps through the Triton kernels: every layer's "
                             "attention (RoPE and the cache write included) and MoC's FFN (default on; "
                             "--no-decode-kernel for the plain PyTorch path, SDPA and the MoC FFN in torch)")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each decode step from a CUDA graph (CUDA only)")
    return parser


def find_checkpoint(path: str) -> Path:
    given = Path(path).expanduser()
    if given.is_file():
        return given
    for candidate in (given / "checkpoints" / "last.ckpt", given / "last.ckpt"):
        if candidate.is_file():
            return candidate
    if given.is_dir():
        raise FileNotFoundError(f"the folder {given} holds no checkpoint: expected {given / 'checkpoints' / 'last.ckpt'} "
                                "(a run folder of `moc train`) or pass a .ckpt file")
    raise FileNotFoundError(f"no such checkpoint: {given} (pass a .ckpt file or a run folder of `moc train`, "
                            "e.g. runs/<experiment>/<run>)")


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's message is long and suggests unsafe loading; name the file instead
        raise ValueError(f"cannot read the checkpoint {path}: it is not a PyTorch checkpoint saved by `moc train` "
                         f"({type(exc).__name__})") from exc


def build_model(ckpt: dict, path: Path) -> MoCTransformer:
    try:
        model_cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    except KeyError as exc:
        raise ValueError(f"{path} is not a checkpoint of `moc train`: it has no hyper_parameters.model") from exc
    model = MoCTransformer(model_cfg)
    state = {k[len(MODEL_PREFIX):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(MODEL_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not fit the model its hyperparameters describe "
                         f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})")
    return model


def _data_config(ckpt: dict, path: Path) -> Optional[dict]:
    recorded = ckpt.get("MoCDataModule", {}).get("config")
    if recorded:
        return recorded
    saved = path.parent.parent / "config.yaml"  # run_dir/<experiment>/<run>/config.yaml
    if saved.is_file():
        return (yaml.safe_load(saved.read_text()) or {}).get("data")
    return None


def load_run_tokenizer(ckpt: dict, path: Path, override: Optional[str]):
    from moc_lightning.data import DataConfig, load_tokenizer

    data = _data_config(ckpt, path)
    if override is not None:
        cache_dir = DataConfig(**data).cache_dir if data else None
        return load_tokenizer(override, cache_dir=cache_dir)
    if data is None:
        raise FileNotFoundError(f"cannot tell which tokenizer {path} was trained with: the checkpoint records no data "
                                f"config and there is no config.yaml beside its run folder; pass --tokenizer")
    config = DataConfig(**data)
    tokenizer = load_tokenizer(config.tokenizer_spec, cache_dir=config.resolved_cache_dir())
    expected = ckpt.get("MoCDataModule", {}).get("tokenizer")
    if expected not in (None, tokenizer.identity):
        raise ValueError(f"the tokenizer found now ({tokenizer.name}, {tokenizer.identity}) is not the one {path} was "
                         f"trained with ({expected}): pass the right one with --tokenizer")
    return tokenizer


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def run_generate(args: argparse.Namespace) -> str:
    """Print (and return) the continuation of args.prompt."""
    from moc_lightning.inference import generate

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens = {args.max_new_tokens} must be >= 0")
    if not args.greedy and not args.temperature > 0:
        raise ValueError(f"--temperature = {args.temperature} must be > 0 (or use --greedy)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p = {args.top_p} must be in (0, 1]")
    path = find_checkpoint(args.checkpoint)
    ckpt = load_checkpoint(path)
    model = build_model(ckpt, path)
    tokenizer = load_run_tokenizer(ckpt, path, args.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    device = _device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, and this run is on {device}")
    model.to(device).eval()
    if args.decode_kernel and device.type == "cuda":
        model.prepare_for_decode()
    # encode() ends every document with EOS; a prompt is an unfinished document, so drop it.
    prompt_ids = tokenizer.encode(args.prompt)[:-1] or [tokenizer.eos_id]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                   temperature=args.temperature, top_p=args.top_p, stop_tokens=[tokenizer.eos_id],
                   generator=generator, cuda_graph=args.cuda_graph)
    text = tokenizer.decode(out.tokens[0])
    print(text)
    sys.stdout.flush()
    return text
