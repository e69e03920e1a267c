"""The config tree: YAML + preset + overrides, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from cisslib.config import ConfigError, from_dict, load_config, parse_override, to_dict

REPO = Path(__file__).resolve().parent.parent


def test_defaults_reproduce_the_authors():
    cfg = load_config()
    assert cfg.model.out_indices == [5, 7, 11]
    assert (cfg.loss.ce, cfg.loss.mask, cfg.loss.dice) == (5.0, 50.0, 1.0)
    assert (cfg.loss.gpd, cfg.loss.qd) == (1.0, 0.15)
    assert cfg.train.grad_clip == 35.0 and cfg.train.head_lr_mult == 10.0
    assert (cfg.eval.window, cfg.eval.stride) == (512, 341)
    assert cfg.model.double_cls_embedding and cfg.model.pixel_norm == "imagenet"


def test_yaml_then_preset_then_overrides(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("run: {preset: finetune}\ntrain:\n  base: {iters: 7}\n")
    cfg = load_config(p)
    assert cfg.run.preset == "finetune"
    assert cfg.loss.use_gpd is False and cfg.loss.use_qd is False
    assert cfg.train.base.iters == 7
    # --set wins over the preset, and ints are accepted for floats
    cfg = load_config(p, ["loss.use_gpd=true", "train.base.lr=1"])
    assert cfg.loss.use_gpd is True and cfg.train.base.lr == 1.0
    cfg = load_config(p, ["run.preset=no_cacp"])
    assert cfg.model.class_head == "query" and cfg.loss.use_gpd is True
    cfg = load_config(p, ["run.preset=joint"])
    assert cfg.scenario.joint is True


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  bse: {iters: 3}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'train\.bse'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"--set: unknown key 'model\.nope'"):
        load_config(None, ["model.nope=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=two", r"'train\.batch_size' must be an integer"),
        ("loss.use_gpd=3", r"'loss\.use_gpd' must be true or false"),
        ("model.out_indices=[1, x]", r"'model\.out_indices\[1\]' must be an integer"),
        ("scenario.mode=sideways", r"'scenario\.mode' is 'sideways'; allowed values"),
        ("run.preset=magic", r"run\.preset is 'magic'; available presets"),
        ("eval.stride=600", r"eval\.stride \(600\) exceeds eval\.window"),
        ("train", r"not of the form key\.sub=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=1e-5") == ("a.b", 1e-5)


def test_round_trip_through_dict():
    order = [2, 1, *range(3, 21)]  # a permutation of the toy world's 20 classes
    cfg = load_config(None, ["train.base.iters=3", f"scenario.order={order}"])
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_every_params_file_loads():
    files = sorted((REPO / "params").glob("*.yaml"))
    assert len(files) >= 17  # smoke, demo, 6 toy, 6 VOC, 4 ADE
    for f in files:
        load_config(f)


def test_toy_world_keys_reach_the_sources():
    from cisslib.build import build_sources

    # smoke.yaml names no radius: the generator's default
    train, val = build_sources(load_config(REPO / "params" / "smoke.yaml"))
    assert train.radius == val.radius == (0.07, 0.24) and train.max_objects == 3
    cfg = load_config(REPO / "params" / "toy_15-1.yaml", ["scenario.toy.radius=[0.1, 0.2]"])
    train, val = build_sources(cfg)
    assert train.radius == val.radius == (0.1, 0.2) and val.max_objects == 2
    assert len(val) == 500 and train.split == "train" and val.split == "val"


def test_missing_params_file():
    with pytest.raises(ConfigError, match=r"params file .*nope\.yaml does not exist"):
        load_config("nope.yaml")


def test_exponent_without_dot_in_yaml_is_a_number(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  base: {lr: 1e-5}\n")
    assert load_config(p).train.base.lr == 1e-5
