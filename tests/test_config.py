import math

import pytest

from wsss.config import Config, ConfigError, config_from_dict, list_presets, load_config, save_config


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_are_typed():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.method.name == "patch_classification"
    assert cfg.train.epochs > 0 and cfg.data.format == "auto"


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "data:\n  root: /data/base\n  crop_size: 128\ntrain:\n  epochs: 5\n  lr: 0.1\n")
    child = write(
        tmp_path / "child.yaml",
        "_base_: base.yaml\ntrain:\n  epochs: 7\nmethod:\n  name: cam\n  tau: -2\n  reg:\n    weight: 0.5\n",
    )
    cfg = load_config(child, ["train.seed=3", "data.root=/data/x", "method.reg.ema=0.99", "infer.scales=[0.5,1]"])
    assert cfg.data.crop_size == 128  # inherited
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.1  # child wins, sibling keys kept
    assert cfg.train.seed == 3 and cfg.data.root == "/data/x"
    assert cfg.method.name == "cam" and cfg.method.tau == -2.0 and isinstance(cfg.method.tau, float)
    assert cfg.method.reg.weight == 0.5 and cfg.method.reg.ema == 0.99
    assert cfg.infer.scales == [0.5, 1.0]


def test_base_list_merges_in_order(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  epochs: 1\n  lr: 0.5\n")
    write(tmp_path / "b.yaml", "train:\n  epochs: 2\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = load_config(child)
    assert (cfg.train.epochs, cfg.train.lr) == (2, 0.5)


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean 'train\.epochs'"):
        load_config(None, ["train.epoch=3"])
    bad = write(tmp_path / "bad.yaml", "trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'trian'.*did you mean 'train'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"method\.pce\.wieght.*did you mean 'method\.pce\.weight'"):
        load_config(None, ["method.pce.wieght=1"])
    with pytest.raises(ConfigError, match="unknown method 'cma'.*did you mean 'cam'"):
        load_config(None, ["method.name=cma"])


def test_extent_areas_are_shares_and_the_target_is_under_the_bound():
    with pytest.raises(ConfigError, match=r"infer\.extent_target_area \(0\.5\) must be under infer\.extent_max_area"):
        load_config("demo/vit_pcm", ["infer.extent_target_area=0.5"])
    with pytest.raises(ConfigError, match=r"infer\.extent_max_area: a share of the pixels, 0-1; got 40"):
        load_config(None, ["infer.extent_max_area=40"])
    assert load_config(None, ["infer.extent_max_area=0", "infer.extent_target_area=0.5"]).infer.extent_target_area == 0.5


def test_type_errors_are_named():
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_config(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=[1]"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = write(tmp_path / "evil.yaml", "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(evil)


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(None, ["method.name=cam", "method.tau=inf", "train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and math.isinf(again.method.tau)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_presets_load():
    names = list_presets()
    assert "demo/tkp_pcl" in names
    for name in names:
        if "_base_" in name:
            continue
        cfg = load_config(name)
        assert cfg.train.epochs > 0, name
