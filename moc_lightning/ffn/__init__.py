"""FFN variants (dense SwiGLU, MoC, ReLU, dReLU, BackRazor), built from one validated config."""

from moc_lightning.ffn.config import KINDS, PLACEMENTS, TOPK_BACKENDS, FFNConfig, parse_group
from moc_lightning.ffn.functions import BackRazorFunction, MoCFunction
from moc_lightning.ffn.modules import FFN_CLASSES, GatedFFN, build_ffn
from moc_lightning.ffn.topk import channel_scores, select_channels

__all__ = [
    "KINDS", "PLACEMENTS", "TOPK_BACKENDS", "FFNConfig", "parse_group", "build_ffn", "GatedFFN",
    "FFN_CLASSES", "MoCFunction", "BackRazorFunction", "select_channels", "channel_scores",
]
