"""The real Hydra configs compose, and bad settings fail early with the valid choices."""
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from nmt.config import Config, ConfigError, conf_dir, from_dict, register_configs, to_config, to_dict

register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = to_config(compose_cfg())
    assert isinstance(cfg, Config)
    assert cfg.data.name == "bible-ko-en" and cfg.model.d_model == 256 and cfg.optim.name == "wsd"


def test_a_schedule_chosen_on_the_command_line_keeps_its_own_defaults():
    """The default recipe's LR settings live in conf/optim/wsd.yaml, not in config.yaml, where they
    would silently apply to optim=noam too (warmup 600 with factor 1: a peak of 2.6e-3)."""
    assert (lambda o: (o.lr, o.warmup_steps))(to_config(compose_cfg()).optim) == (2e-3, 600)
    noam = to_config(compose_cfg("optim=noam")).optim
    assert (noam.factor, noam.warmup_steps) == (1.0, 4000)


@pytest.mark.parametrize("experiment,d_model,schedule", [("paper_base", 512, "noam"), ("gpu_base", 512, "wsd")])
def test_experiment_recipes_compose(experiment, d_model, schedule):
    cfg = to_config(compose_cfg(f"+experiment={experiment}"))
    assert (cfg.model.d_model, cfg.optim.name) == (d_model, schedule)


@pytest.mark.parametrize("preset,d_model,layers", [("tiny", 32, 2), ("small", 256, 4), ("base", 512, 6)])
def test_model_presets(preset, d_model, layers):
    cfg = to_config(compose_cfg(f"model={preset}"))
    assert (cfg.model.d_model, cfg.model.n_encoder_layers, cfg.model.n_decoder_layers) == (d_model, layers, layers)


def test_overrides_reach_every_group():
    cfg = to_config(compose_cfg("model=small", "optim.warmup_steps=2000", "train.max_epochs=50",
                                "model.dropout=0.2", "model.decoder_layers=2", "tokenizer.vocab_size=4000",
                                "data=tatoeba_ko_en", "train.early_stopping.metric=chrf", "device=cpu"))
    assert cfg.optim.warmup_steps == 2000 and cfg.train.max_epochs == 50 and cfg.model.dropout == 0.2
    assert cfg.model.n_decoder_layers == 2 and cfg.model.n_encoder_layers == 4
    assert cfg.tokenizer.vocab_size == 4000 and cfg.data.name == "tatoeba-ko-en"
    assert cfg.train.early_stopping.metric == "chrf"


def test_misspelt_key_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("train.max_step=10")


@pytest.mark.parametrize("override,needle", [
    ("model.norm=middle", "pre, post"),
    ("train.early_stopping.metric=accuracy", "valid_loss, bleu, chrf"),
    ("optim.name=linear", "noam, inverse_sqrt"),
    ("device=tpu", "auto, cpu, cuda"),
    ("model.heads=3", "multiple of model.heads"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_invalid_values_name_the_valid_choices(override, needle):
    with pytest.raises(ConfigError, match=needle):
        to_config(compose_cfg(override))


def test_shared_embeddings_need_a_joint_vocabulary():
    with pytest.raises(ConfigError, match="tokenizer.joint"):
        to_config(compose_cfg("tokenizer.joint=false", "model.share_embeddings=all"))
    cfg = to_config(compose_cfg("tokenizer.joint=false", "model.share_embeddings=decoder"))
    assert cfg.model.share_embeddings == "decoder"


def test_training_needs_an_end():
    with pytest.raises(ConfigError, match="training would never end"):
        to_config(compose_cfg("train.max_epochs=0", "train.max_steps=0", "train.max_minutes=0"))


def test_dict_round_trip_is_plain_data():
    cfg = to_config(compose_cfg("model=tiny"))
    d = to_dict(cfg)
    assert from_dict(d) == cfg

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (str, int, float, bool))
    assert plain(d)
