"""Typed configuration: one dataclass per Hydra config group, validated once.

The dataclasses are registered in Hydra's ConfigStore as the schema of the
YAML files under ``conf/``, so an override with a misspelt key fails at start
with the list of valid keys, and :func:`validate` checks the values across
fields (a user sees ``ConfigError`` naming the key and the valid choices).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A setting a user gave is invalid; the message names it and the valid values."""


# ----------------------------------------------------------------------------- groups
@dataclass
class DownloadConfig:
    """Where a corpus comes from when its files are missing (empty = never download)."""

    # split name -> URL of a .tar.gz holding that split's .ko/.en files
    urls: Dict[str, str] = field(default_factory=dict)
    # file names inside the archives: "{split}" and "{lang}" are filled in
    # (e.g. "korean-english-park.{split}.{lang}"); empty = any "*{split}*.{lang}"
    member_pattern: str = ""
    # split name -> expected sha256 of the archive (missing or "" = not checked)
    sha256: Dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0              # seconds without data before a download gives up


@dataclass
class MixConfig:
    """Pairs of another corpus mixed into the training split (fine-tuning: against forgetting)."""
    name: Optional[str] = None         # corpus folder inside data.root (e.g. the corpus the model was trained on)
    ratio: float = 0.0                 # its share per unit of data.name's training data (0.25 = a fifth of the mixture)
    unit: str = "pairs"                # what ratio counts: pairs | tokens (source + target tokens: corpora with
                                       # longer sentences take their share of the batches, not more)


@dataclass
class DataConfig:
    name: str = "bible-ko-en"          # corpus folder inside ``root``
    root: str = "data"                 # folder that holds corpora (conf: ${oc.env:NMT_DATA_DIR,data})
    src_lang: str = "ko"
    tgt_lang: str = "en"
    train: str = "train"               # split file stems: {train}.{src_lang}
    dev: str = "dev"
    test: str = "test"
    train_limit: int = 0               # use only the first N training pairs (0 = all)
    dev_limit: int = 0                 # use only the first N dev pairs (0 = all)
    # filters (training split only; dev/test are never filtered)
    max_len: int = 256                 # drop pairs with more subword tokens than this on either side
    min_len: int = 1                   # drop pairs with fewer tokens (1 drops empty sides)
    max_ratio: float = 4.0             # drop pairs whose token-length ratio exceeds this (0 = off)
    cache_dir: Optional[str] = None    # token cache of the training split (null: tokens/ beside tokenizer.cache_dir)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    mix: MixConfig = field(default_factory=MixConfig)


@dataclass
class TokenizerConfig:
    model_type: str = "unigram"        # unigram | bpe
    vocab_size: int = 8000
    joint: bool = True                 # one shared ko+en vocabulary
    character_coverage: float = 0.9995
    byte_fallback: bool = False        # characters outside the coverage become UTF-8 byte pieces, not UNK
    input_sentence_size: int = 300_000  # sentences sampled to train sentencepiece (0 = all; 1M held ~3 GB)
    shuffle_input_sentence: bool = True  # sample them at random (sentencepiece's fixed seed: reproducible)
    num_threads: int = 4               # trainer threads; the trained model depends on it, so it is fixed here
    quiet: bool = True                 # hide sentencepiece's own training log
    cache_dir: str = "~/.cache/nmt/tokenizers"  # conf: ${oc.env:NMT_CACHE_DIR,...}


@dataclass
class ModelConfig:
    d_model: int = 256
    layers: int = 4                    # shorthand for encoder_layers and decoder_layers
    encoder_layers: Optional[int] = None
    decoder_layers: Optional[int] = None
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.3               # residual / embedding dropout
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1
    source_word_dropout: float = 0.0   # zero whole source token embeddings with this probability (training only)
    target_word_dropout: float = 0.0   # ... and decoder-input token embeddings
    activation: str = "relu"           # relu | gelu
    norm: str = "pre"                  # pre | post
    share_embeddings: str = "none"     # all | decoder | none (none measured best; README)
    max_positions: int = 1024

    @property
    def n_encoder_layers(self) -> int:
        return self.encoder_layers if self.encoder_layers is not None else self.layers

    @property
    def n_decoder_layers(self) -> int:
        return self.decoder_layers if self.decoder_layers is not None else self.layers


@dataclass
class OptimConfig:
    name: str = "noam"                 # noam | inverse_sqrt | cosine | cosine_restarts | constant | plateau | wsd
    factor: float = 1.0                # noam: lr = factor * d_model^-0.5 * min(step^-0.5, step*warmup^-1.5)
    peak_lr: Optional[float] = None    # noam: when set, factor is derived so the peak equals this
    lr: float = 5e-4                   # peak LR of the other schedules
    warmup_steps: int = 4000
    warmup_init_lr: float = 0.0        # inverse_sqrt / cosine / constant: LR at step 0 of warmup
    total_steps: Optional[int] = None  # cosine: decay length (default: train.max_steps)
    min_lr_ratio: float = 0.0          # cosine / cosine_restarts / wsd: floor as a fraction of lr
    decay_fraction: float = 0.2        # wsd: share of the run spent decaying at the end
    decay_shape: str = "linear"        # wsd: linear | sqrt (1 - sqrt) | cosine
    restart_period: int = 10000        # cosine_restarts: first period (steps after warmup)
    period_mult: float = 1.0           # cosine_restarts: each period is this much longer
    plateau_factor: float = 0.5        # plateau: multiply LR by this ...
    plateau_patience: int = 3          # ... after this many validations without improvement
    min_lr: Optional[float] = None     # clip every schedule from below
    max_lr: Optional[float] = None     # ... and above
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0


@dataclass
class EarlyStoppingConfig:
    metric: str = "bleu"               # valid_loss | bleu | chrf
    patience: int = 5                  # validations without improvement before stopping (0 = off)
    min_delta: float = 0.0


@dataclass
class DecodeConfig:
    """Search settings; stored in checkpoints as the translator's defaults."""

    beam_size: int = 1
    length_penalty: float = 1.0
    length_penalty_mode: str = "power"  # power | gnmt
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_len: int = 0
    max_len_a: float = 1.5
    max_len_b: int = 10
    nbest: int = 1
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class ValidConfig:
    max_sentences: int = 500           # dev sentences translated for BLEU/chrF (0 = all)
    batch_size: int = 64               # sentences per decoding batch
    samples: int = 3                   # sample translations logged to TensorBoard / the log
    decode: DecodeConfig = field(default_factory=DecodeConfig)


@dataclass
class TrainConfig:
    max_steps: int = 0                 # optimizer updates (0 = no limit)
    max_epochs: int = 0                # (0 = no limit); at least one of the two must be set
    max_tokens: int = 4096             # token budget of one batch (padded, source or target side)
    accumulate: int = 1                # batches per optimizer update
    clip_norm: float = 1.0             # 0 = no clipping
    label_smoothing: float = 0.1
    valid_every: int = 500             # steps between validations (0 = only at epoch end)
    valid_every_epoch: bool = True     # also validate at the end of every epoch
    save_every: int = 0                # steps between last.pt saves (0 = at validation only)
    keep_last: int = 3                 # periodic step-N.pt checkpoints to keep
    save_every_minutes: float = 0.0    # also write a step-N.pt every this many minutes (0 = off)
    average_last: int = 0              # at the end, average the last N step-N.pt into averaged.pt (0 = off)
    log_every: int = 50
    seed: int = 1
    resume: Any = False                # false | true (last.pt of this run dir) | PATH
    init_from: Optional[str] = None    # start a new run from this checkpoint's weights and tokenizer (fine-tuning)
    init_keep: List[str] = field(default_factory=list)   # with init_from: also keep [optimizer, schedule]
    max_bad_steps: int = 10            # non-finite updates in a row before aborting
    src_gain_warn: float = 0.1         # warn when src_gain stays below this after warmup
    bucket_size: int = 100             # batches per length-sorted pool
    length_multiple: int = 0           # pad batch lengths to a multiple of this (0 = auto: 8)
    batch_multiple: int = 0            # sentences per batch in multiples of this (0 = auto, as length_multiple)
    progress: bool = True              # tqdm progress bar
    max_minutes: float = 0.0           # stop (validate, save) after this much time in this invocation (0 = no limit)
    threads: int = 0                   # torch CPU threads (0 = torch's default)
    compile: bool = False              # torch.compile the model (checkpoints keep the plain weights)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    valid: ValidConfig = field(default_factory=ValidConfig)
    # defaults of the translator, stored in every checkpoint (scripts/translate.py flags override them)
    decode: DecodeConfig = field(default_factory=lambda: DecodeConfig(beam_size=5, nbest=1))
    device: str = "auto"               # auto | cpu | cuda
    precision: str = "auto"            # auto (bf16 autocast on GPUs with bf16 and, for training, CPUs whose bf16 matmuls measure faster) | fp32 | bf16


# regularisation settings: they may change between a checkpoint and the run that resumes or averages it
DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "source_word_dropout", "target_word_dropout")


# ----------------------------------------------------------------------------- choices
CHOICES: dict[str, tuple] = {
    "tokenizer.model_type": ("unigram", "bpe"),
    "model.activation": ("relu", "gelu"),
    "model.norm": ("pre", "post"),
    "model.share_embeddings": ("all", "decoder", "none"),
    "optim.name": ("noam", "inverse_sqrt", "cosine", "cosine_restarts", "constant", "plateau", "wsd"),
    "optim.decay_shape": ("linear", "sqrt", "cosine"),
    "train.early_stopping.metric": ("valid_loss", "bleu", "chrf"),
    "valid.decode.length_penalty_mode": ("power", "gnmt"),
    "decode.length_penalty_mode": ("power", "gnmt"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate_decode(d: DecodeConfig, prefix: str = "decode") -> None:
    """Range checks for search settings (shared by training config and the translate CLI)."""
    _require(d.beam_size >= 1, f"{prefix}.beam_size must be >= 1, got {d.beam_size}")
    _require(d.repetition_penalty > 0, f"{prefix}.repetition_penalty must be > 0, got {d.repetition_penalty}")
    _require(d.no_repeat_ngram_size >= 0, f"{prefix}.no_repeat_ngram_size must be >= 0, got {d.no_repeat_ngram_size}")
    _require(d.min_len >= 0, f"{prefix}.min_len must be >= 0, got {d.min_len}")
    _require(d.max_len_a >= 0 and d.max_len_b >= 0,
             f"{prefix}.max_len_a and max_len_b must be >= 0, got {d.max_len_a}, {d.max_len_b}")
    _require(1 <= d.nbest <= d.beam_size, f"{prefix}.nbest must be between 1 and beam_size ({d.beam_size}), got {d.nbest}")
    _require(d.temperature > 0, f"{prefix}.temperature must be > 0, got {d.temperature}")
    _require(d.top_k >= 0, f"{prefix}.top_k must be >= 0, got {d.top_k}")
    _require(0 < d.top_p <= 1, f"{prefix}.top_p must be in (0, 1], got {d.top_p}")
    _require(d.length_penalty_mode in CHOICES["valid.decode.length_penalty_mode"],
             f"{prefix}.length_penalty_mode={d.length_penalty_mode!r} is not one of power, gnmt")


def validate_optim(o: OptimConfig) -> None:
    """Range checks for the LR schedule and Adam settings (``nmt.schedules`` adds the
    checks that need the number of training steps)."""
    _require(o.name in CHOICES["optim.name"],
             f"optim.name={o.name!r} is not valid; choose one of: {', '.join(CHOICES['optim.name'])}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    if o.name == "noam":
        _require(o.warmup_steps > 0, "optim.warmup_steps must be > 0 for the noam schedule")
        _require(o.factor > 0, f"optim.factor must be > 0, got {o.factor}")
        _require(o.peak_lr is None or o.peak_lr > 0, f"optim.peak_lr must be > 0, got {o.peak_lr}")
    else:
        _require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        _require(o.warmup_init_lr >= 0, f"optim.warmup_init_lr must be >= 0, got {o.warmup_init_lr}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _require(0.0 < o.decay_fraction <= 1.0, f"optim.decay_fraction must be in (0, 1], got {o.decay_fraction}")
    _require(o.decay_shape in CHOICES["optim.decay_shape"],
             f"optim.decay_shape={o.decay_shape!r} is not valid; choose one of: "
             f"{', '.join(CHOICES['optim.decay_shape'])}")
    _require(o.restart_period >= 1, f"optim.restart_period must be >= 1, got {o.restart_period}")
    _require(o.period_mult >= 1.0, f"optim.period_mult must be >= 1, got {o.period_mult}")
    _require(0.0 < o.plateau_factor <= 1.0, f"optim.plateau_factor must be in (0, 1], got {o.plateau_factor}")
    _require(o.plateau_patience >= 0, f"optim.plateau_patience must be >= 0, got {o.plateau_patience}")
    _require(o.min_lr is None or o.min_lr >= 0, f"optim.min_lr must be >= 0, got {o.min_lr}")
    _require(o.min_lr is None or o.max_lr is None or o.min_lr <= o.max_lr,
             f"optim.min_lr ({o.min_lr}) must be <= optim.max_lr ({o.max_lr})")
    _require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two values in [0, 1), got {o.betas}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; raises ConfigError with the key and the valid values."""
    for key, choices in CHOICES.items():
        value = _get(cfg, key)
        _require(value in choices, f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    m, t, o = cfg.model, cfg.train, cfg.optim
    _require(m.d_model > 0 and m.heads > 0 and m.d_model % m.heads == 0,
             f"model.d_model ({m.d_model}) must be a positive multiple of model.heads ({m.heads})")
    _require(m.n_encoder_layers >= 1 and m.n_decoder_layers >= 1, "model needs at least one encoder and one decoder layer")
    _require(m.ffn > 0, f"model.ffn must be > 0, got {m.ffn}")
    for name in DROPOUT_KEYS:
        v = getattr(m, name)
        _require(0.0 <= v < 1.0, f"model.{name} must be in [0, 1), got {v}")
    _require(cfg.tokenizer.vocab_size >= 16, f"tokenizer.vocab_size must be >= 16, got {cfg.tokenizer.vocab_size}")
    _require(0 < cfg.tokenizer.character_coverage <= 1, "tokenizer.character_coverage must be in (0, 1]")
    if m.share_embeddings == "all":
        _require(cfg.tokenizer.joint, "model.share_embeddings=all needs tokenizer.joint=true "
                 "(one vocabulary for both languages); use share_embeddings=decoder with separate vocabularies")
    _require(t.max_steps > 0 or t.max_epochs > 0 or t.max_minutes > 0,
             "set train.max_steps, train.max_epochs or train.max_minutes (all are 0: training would never end)")
    _require(t.max_tokens > 0, f"train.max_tokens must be > 0, got {t.max_tokens}")
    _require(t.accumulate >= 1, f"train.accumulate must be >= 1, got {t.accumulate}")
    _require(0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _require(t.clip_norm >= 0, f"train.clip_norm must be >= 0, got {t.clip_norm}")
    _require(t.keep_last >= 0, f"train.keep_last must be >= 0, got {t.keep_last}")
    _require(t.average_last >= 0 and t.save_every_minutes >= 0,
             "train.average_last and train.save_every_minutes must be >= 0")
    _require(t.valid_every >= 0 and (t.valid_every > 0 or t.valid_every_epoch),
             "validation never runs: set train.valid_every > 0 or train.valid_every_epoch=true")
    _require(t.max_minutes >= 0 and t.threads >= 0, "train.max_minutes and train.threads must be >= 0")
    bad_keep = [k for k in t.init_keep if k not in ("optimizer", "schedule")]
    _require(not bad_keep, f"train.init_keep={list(t.init_keep)} is not valid; choose from: optimizer, schedule")
    _require(not t.init_keep or t.init_from, "train.init_keep needs train.init_from")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _require(cfg.data.max_len >= cfg.data.min_len >= 0, "data.max_len must be >= data.min_len >= 0")
    _require(cfg.data.max_ratio >= 0, "data.max_ratio must be >= 0 (0 turns the ratio filter off)")
    m = cfg.data.mix
    _require(m.ratio >= 0, f"data.mix.ratio must be >= 0, got {m.ratio}")
    _require(not m.ratio or m.name, "data.mix.ratio needs data.mix.name (the corpus to mix in)")
    _require(m.unit in ("pairs", "tokens"), f"data.mix.unit={m.unit!r} is not valid; choose one of: pairs, tokens")
    _require(not m.name or m.name != cfg.data.name, f"data.mix.name is data.name ({m.name}); name another corpus")
    validate_optim(o)
    validate_decode(cfg.valid.decode, "valid.decode")
    validate_decode(cfg.decode, "decode")
    return cfg


# ----------------------------------------------------------------------------- conversion
def to_config(cfg: DictConfig | dict | Config) -> Config:
    """Turn a (Hydra-composed) DictConfig or plain dict into a validated ``Config``."""
    if isinstance(cfg, Config):
        return validate(cfg)
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    # strip keys that are not part of the schema (e.g. hydra's own node)
    merged = OmegaConf.merge(OmegaConf.structured(Config), {k: v for k, v in cfg.items() if k in _field_names(Config)})
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return validate(obj)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def to_dict(cfg: Config) -> dict:
    """Plain dict of builtins (for checkpoints, which are loaded with weights_only=True)."""
    def clean(v: Any) -> Any:
        if is_dataclass(v):
            return {k: clean(x) for k, x in asdict(v).items()}
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(cfg)


def from_dict(d: dict) -> Config:
    """Inverse of :func:`to_dict` (used when loading a checkpoint)."""
    return to_config(OmegaConf.create(d))


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called by the entry points)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="nmt_schema", node=Config)


def conf_dir() -> Path:
    """The repository's ``conf/`` folder (override with NMT_CONF_DIR)."""
    env = os.environ.get("NMT_CONF_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "conf").resolve()


def repo_data_dir() -> Path:
    """The repository's ``data/`` folder, where the embedded default corpus lives."""
    return (Path(__file__).resolve().parents[2] / "data").resolve()
