"""Bad FFN settings are refused when the config is built, naming the field, value and range."""

from __future__ import annotations

import pytest

from moc_lightning.ffn import FFNConfig

BASE = dict(d_model=64, d_ffn=172)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"kind": "moc", "k": 0}, r"FFNConfig\.k = 0 .*1 <= k <= d_ffn = 172"),
        ({"kind": "moc", "k": -3}, r"FFNConfig\.k = -3 .*1 <= k <= d_ffn = 172"),
        ({"kind": "moc", "k": 173}, r"FFNConfig\.k = 173 .*1 <= k <= d_ffn = 172"),
        ({"kind": "moc", "k": 2.5}, r"FFNConfig\.k = 2\.5 .*integer"),
        ({"kind": "moc", "group": "0:4"}, r"FFNConfig\.group = '0:4' .*a = 0 must be >= 1.*1 <= a <= b"),
        ({"kind": "moc", "group": "-1:4"}, r"FFNConfig\.group = '-1:4' .*a = -1 must be >= 1"),
        ({"kind": "moc", "group": "5:4"}, r"FFNConfig\.group = '5:4' .*a = 5 must be <= b = 4"),
        ({"kind": "moc", "group": "1:0"}, r"FFNConfig\.group = '1:0' .*b = 0 must be >= 1"),
        ({"kind": "moc", "group": "2-8"}, r"FFNConfig\.group = '2-8' .*'a:b'"),
        ({"kind": "dense"}, r"FFNConfig\.kind = 'dense' .*swiglu, moc, relu, drelu, backrazor"),
        ({"kind": "moc", "placement": "after"}, r"FFNConfig\.placement = 'after' .*pre_silu, post_silu"),
        ({"kind": "moc", "topk_backend": "cub"}, r"FFNConfig\.topk_backend = 'cub' .*auto, torch"),
        ({"backrazor_keep": 0.0}, r"FFNConfig\.backrazor_keep = 0\.0 .*0 < backrazor_keep <= 1"),
        ({"backrazor_keep": 1.5}, r"FFNConfig\.backrazor_keep = 1\.5 .*0 < backrazor_keep <= 1"),
        ({"d_model": 0}, r"FFNConfig\.d_model = 0 .*integer >= 1"),
        ({"d_ffn": -8}, r"FFNConfig\.d_ffn = -8 .*integer >= 1"),
        ({"recompute": "yes"}, r"FFNConfig\.recompute = 'yes' .*true or false"),
    ],
)
def test_bad_settings_are_refused(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        FFNConfig(**{**BASE, **changes})


def test_defaults_and_derived_values():
    cfg = FFNConfig(kind="moc", **BASE)
    assert cfg.k == 32  # the paper's K = d_model / 2
    assert cfg.kept_channels == 32 and cfg.label == "moc_k32"
    grouped = FFNConfig(kind="moc", group="2:8", **BASE)  # 21 groups of 8 and one of 4
    assert grouped.group_ab == (2, 8) and grouped.kept_channels == 21 * 2 + 2
    assert FFNConfig(kind="moc", group="3:8", d_model=64, d_ffn=10).kept_channels == 3 + 2
    assert FFNConfig(kind="swiglu", checkpoint=True, **BASE).label == "swiglu+gcp"
    assert FFNConfig(kind="moc", k=16, **BASE).replace(k=8).k == 8
    with pytest.raises(ValueError, match="FFNConfig.k = 999"):
        FFNConfig(kind="moc", k=16, **BASE).replace(k=999)
