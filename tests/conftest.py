"""Shared fixtures: a tiny random CLIP (builds in milliseconds) and a segmenter on it."""

from __future__ import annotations

import os

import pytest
import torch

from cisslib.model.clip import load_clip, tiny_clip_config

# Tests run on small shared CPUs: with several OpenMP threads competing for two busy cores the
# tiny models ran 10-20x slower (measured: 42 s vs 2 s). One thread unless asked otherwise.
torch.set_num_threads(int(os.environ.get("CISSLIB_TEST_THREADS", "1")))


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """No test reads or writes the user's cache (text embeddings, membership, tiny CLIP)."""
    old = os.environ.get("CISSLIB_CACHE")
    os.environ["CISSLIB_CACHE"] = str(tmp_path_factory.mktemp("cisslib-cache"))
    yield
    if old is None:
        os.environ.pop("CISSLIB_CACHE", None)
    else:
        os.environ["CISSLIB_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    """``model_cfg`` of the tiny CLIP: width 64, 3 layers, patch 8, 64x64, joint dim 64."""
    return tiny_clip_config()


@pytest.fixture(scope="session")
def tiny_clip(tiny_cfg):
    """``(model, tokenizer)`` of a tiny random CLIP (seeded; do not modify it in a test)."""
    torch.manual_seed(0)
    return load_clip(model_cfg=tiny_cfg)


@pytest.fixture
def tiny_segmenter(tiny_clip):
    """A fresh tiny CLIPSegmenter (3 stages on blocks 0, 1, 2; 4 heads; FFN 128), eval mode."""
    from cisslib.model.segmenter import build_segmenter

    torch.manual_seed(1)
    model = build_segmenter(tiny_clip[0], out_indices=(0, 1, 2), num_heads=4, ffn_dim=128)
    return model.eval()


@pytest.fixture
def tiny_text():
    """``(5, 64)`` random unit text embeddings."""
    g = torch.Generator().manual_seed(2)
    return torch.nn.functional.normalize(torch.randn(5, 64, generator=g), dim=-1)
