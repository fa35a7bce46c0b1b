import pytest
import yaml

from modaseg.config import Config, ConfigError, load_config, save_config, to_dict

CONFIGS = sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_are_offline(path):
    cfg = load_config(path)
    assert cfg.model.encoder_weights is None  # runnable without a download


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
