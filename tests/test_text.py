"""Text embeddings: templates, ensemble averaging, the disk cache and the authors' .npy files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cisslib.model.text import (
    ENSEMBLE_TEMPLATES,
    SINGLE_TEMPLATES,
    class_text_embeddings,
    encode_class_names,
    load_text_embeddings,
)


def test_templates():
    assert SINGLE_TEMPLATES == ("a photo of a {}",)  # no final period (SPEC 1.2)
    assert len(ENSEMBLE_TEMPLATES) == 15 and len(set(ENSEMBLE_TEMPLATES)) == 15
    assert all(t.count("{}") == 1 for t in ENSEMBLE_TEMPLATES)


def test_single_template_equals_encode_text(tiny_clip):
    model, tok = tiny_clip
    got = encode_class_names(model, tok, ["cat", "dog", "bus"], SINGLE_TEMPLATES)
    with torch.no_grad():
        raw = model.encode_text(tok(["a photo of a cat", "a photo of a dog", "a photo of a bus"]))
    want = raw / raw.norm(dim=-1, keepdim=True)
    assert got.dtype == torch.float32 and got.shape == (3, 64)
    assert torch.allclose(got, want, atol=1e-6)


def test_ensemble_is_mean_of_normalised_then_renormalised(tiny_clip):
    model, tok = tiny_clip
    names = ["cat", "dog"]
    templates = ENSEMBLE_TEMPLATES[:4]
    got = encode_class_names(model, tok, names, templates)
    for i, name in enumerate(names):
        acc = torch.zeros(64)
        for t in templates:
            with torch.no_grad():
                e = model.encode_text(tok([t.format(name)]))[0]
            acc += e / e.norm()
        want = acc / len(templates)
        want = want / want.norm()
        assert torch.allclose(got[i], want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-6)


def test_bad_templates(tiny_clip):
    with pytest.raises(ValueError, match="slot"):
        encode_class_names(*tiny_clip, ["cat"], ["no slot"])
    with pytest.raises(ValueError, match="names is empty"):
        encode_class_names(*tiny_clip, [], SINGLE_TEMPLATES)


def test_cache_second_call_does_not_run_encoder(tmp_path, tiny_clip, monkeypatch):
    model, tok = tiny_clip
    first = class_text_embeddings(
        model, tok, ["cat", "dog"], SINGLE_TEMPLATES, model_key="tiny:abc", cache_dir=tmp_path
    )
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"
    assert np.load(files[0]).dtype == np.float32

    def boom(*args, **kwargs):
        raise AssertionError("text encoder ran although the cache exists")

    monkeypatch.setattr(model, "encode_text", boom)
    again = class_text_embeddings(
        model, tok, ["cat", "dog"], SINGLE_TEMPLATES, model_key="tiny:abc", cache_dir=tmp_path
    )
    assert torch.equal(first, again)
    # another key, other names or other templates -> a miss (the encoder would run)
    for kwargs in (
        dict(names=["cat", "dog"], templates=SINGLE_TEMPLATES, model_key="tiny:xyz"),
        dict(names=["dog", "cat"], templates=SINGLE_TEMPLATES, model_key="tiny:abc"),
        dict(names=["cat", "dog"], templates=ENSEMBLE_TEMPLATES, model_key="tiny:abc"),
    ):
        with pytest.raises(AssertionError, match="cache exists"):
            class_text_embeddings(model, tok, cache_dir=tmp_path, **kwargs)
    assert len(list(tmp_path.iterdir())) == 1  # failed computations leave nothing behind


def test_default_cache_dir_is_under_cisslib_cache(tmp_path, tiny_clip, monkeypatch):
    monkeypatch.setenv("CISSLIB_CACHE", str(tmp_path))
    class_text_embeddings(*tiny_clip, ["cat"], SINGLE_TEMPLATES, model_key="k")
    assert len(list((tmp_path / "text").glob("*.npy"))) == 1


def test_load_authors_npy(tmp_path):
    arr = np.random.default_rng(0).standard_normal((150, 512)).astype(np.float16)
    path = tmp_path / "ade_single.npy"
    np.save(path, arr)
    got = load_text_embeddings(path, num_classes=100)
    assert got.dtype == torch.float32 and got.shape == (100, 512)
    np.testing.assert_array_equal(got.numpy(), arr[:100].astype(np.float32))
    assert load_text_embeddings(path).shape == (150, 512)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="voc_single.npy"):
        load_text_embeddings(tmp_path / "voc_single.npy")
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros(512, np.float16))
    with pytest.raises(ValueError, match=r"flat.npy.*2-D.*\(512,\)"):
        load_text_embeddings(flat)
    short = tmp_path / "short.npy"
    np.save(short, np.zeros((20, 512), np.float16))
    with pytest.raises(ValueError, match="short.npy: has 20 rows but 21 classes"):
        load_text_embeddings(short, num_classes=21)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="floating point"):
        load_text_embeddings(ints)
