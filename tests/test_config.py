"""Config loading: the shipped configs load, and every kind of bad config names its file and key."""

import dataclasses
from pathlib import Path

import pytest

from kdcache.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo", "strict_small", "mini_real", "real_cpu_xtok"])
def test_shipped_configs_load(name, monkeypatch):
    monkeypatch.setenv("BABYLM_DIR", "/data/babylm")
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert len(cfg.teachers) == 2
    assert cfg.distill.temperature in cfg.cache.temperatures


def test_strict_small_is_the_seed_recipe(monkeypatch):
    monkeypatch.setenv("BABYLM_DIR", "/data/babylm")
    cfg = load_config(REPO / "configs" / "strict_small.yaml")
    assert cfg.corpus.train == ["/data/babylm/train_10M"]
    assert (cfg.tokenizer.vocab_size, cfg.data.seq_len) == (16000, 128)
    llama, gpt2 = cfg.teachers
    assert (llama.model.hidden_size, llama.model.intermediate_size, llama.model.num_layers, llama.model.num_heads) == (256, 1024, 8, 8)
    assert (gpt2.model.arch, gpt2.model.hidden_size, gpt2.model.num_layers, gpt2.model.num_heads) == ("gpt2", 768, 12, 12)
    s = cfg.student
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.tie_embeddings) == (512, 1024, 16, 8, False)
    assert cfg.distill.hard_weight == 0.5 and cfg.teacher_weights() == {"llama-16m": 0.25, "gpt2-97m": 0.25}


def write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: x\nbogus: 1\n", "unknown key 'bogus'"),
        ("name: x\ndata: {seq_len: sixty}\n", "data.seq_len: expected int"),
        ("seed: 1\n", "missing required key 'name'"),
        ("name: x\nteachers: [{name: a, model: {hidden: 3}}]\n", "teachers[0].model: unknown key 'hidden'"),
        ("name: x\ncache: {temperatures: [2.0]}\n", "must include 1.0"),
        ("name: x\ncorpus: {kind: babylm}\n", "corpus.train must list"),
        ("name: x\nteachers: [{name: a, tokenizer: {vocab_size: 300, seq_len: 512}}]\n",
         "teachers[0].model.max_position must be >= teachers[0].tokenizer.seq_len"),
        ("name: x\nteachers: [{name: a, pretrained: d, tokenizer: {vocab_size: 300}}]\n",
         "a pretrained teacher brings its own"),
        ("name: x\nteachers: [{name: a, tokenizer: {vocab_size: 100}}]\n", "teachers[0].tokenizer.vocab_size must be >= 259"),
        ("name: x\ncorpus: {kind: babylm, train: ['${NO_SUCH_VAR_KD}/t']}\n", "NO_SUCH_VAR_KD is not set"),
        ("", "empty"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_default_and_int_to_float(tmp_path, monkeypatch):
    monkeypatch.delenv("KD_UNSET_DIR", raising=False)
    path = write(tmp_path, "name: x\ncorpus: {kind: babylm, train: ['${KD_UNSET_DIR:-/fallback}/t']}\ndistill: {temperature: 1}\n")
    cfg = load_config(path)
    assert cfg.corpus.train == ["/fallback/t"]
    assert isinstance(cfg.distill.temperature, float)


def test_env_in_a_non_string_value_is_read_as_yaml(tmp_path, monkeypatch):
    text = "name: x\nteachers: [{name: a, train: {max_steps: '${KD_TEST_STEPS:-null}'}}]\n"
    monkeypatch.delenv("KD_TEST_STEPS", raising=False)
    assert load_config(write(tmp_path, text)).teachers[0].train.max_steps is None
    monkeypatch.setenv("KD_TEST_STEPS", "40")
    assert load_config(write(tmp_path, text)).teachers[0].train.max_steps == 40
    monkeypatch.setenv("KD_TEST_STEPS", "forty")
    with pytest.raises(ConfigError, match=r"teachers\[0\].train.max_steps: expected int"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize("text, expected", [
    ("name: x\ndistill: {form: magic}\n", "distill.form: 'magic' is not one of ['renorm', 'sampled', 'seed_exact', 'tail', 'xtok_chunk', 'xtok_match', 'xtok_project']"),
    ("name: x\nstudy: {variants: {v: {distill: {form: tial}}}}\n", "study.variants.v.distill.form: 'tial' is not one of"),
])
def test_an_unknown_kd_form_is_refused_when_the_cli_loads_the_config(tmp_path, text, expected):
    """The forms' registry lives in the student stage, which the config may not import: the commands check it."""
    from kdcache.cli.pipeline import load_run_config

    path = write(tmp_path, text)
    load_config(path)  # the schema alone accepts any name ...
    with pytest.raises(ConfigError) as err:  # ... every pipeline command refuses it before any work
        load_run_config(str(path))
    assert str(path) in str(err.value) and expected in str(err.value)


def test_the_real_text_study_config_has_the_variants_the_quality_study_needs():
    from kdcache.cli.pipeline import load_run_config

    cfg = load_run_config(str(REPO / "configs" / "real_cpu.yaml"))  # the KD forms checked too
    assert cfg.study.seeds == [1, 2, 3]
    kinds = {name: v.kind for name, v in cfg.study.variants.items()}
    assert kinds == {"ce": "baseline", "tail": "kd", "tail_t2": "kd", "sampled": "kd", "hidden": "kd", "online": "online",
                     "sampled_h25": "kd", "sampled_h0": "kd"}
    sampled = cfg.variant("sampled", 1)
    assert sampled.distill.form == "sampled" and sampled.distill.temperature == cfg.cache.sample_temperature
    assert cfg.variant("hidden", 1).distill.hidden.weight > 0 and cfg.cache.hidden_layers
    assert all(Path(p).name == "blimp" for p in cfg.eval.minimal_pair_dirs)


def test_the_cross_tokenizer_study_config_distils_each_teacher_with_its_forms(monkeypatch):
    monkeypatch.setenv("BABYLM_DIR", "/data/babylm")
    cfg = load_config(REPO / "configs" / "real_cpu_xtok.yaml")
    same, own = cfg.teachers
    assert same.tokenizer is None and (own.tokenizer.vocab_size, own.tokenizer.model) == (8000, "unigram")
    assert (same.model, same.train.epochs) == (dataclasses.replace(own.model, max_position=64), own.train.epochs)
    forms = {name: (v.kind, cfg.variant(name, 1).distill.form, cfg.variant(name, 1).teacher_weights())
             for name, v in cfg.study.variants.items()}
    assert forms == {"ce": ("baseline", "tail", {"llama_b": 0.5}), "tail_b": ("kd", "tail", {"llama_b": 0.5}),
                     "sampled_b": ("kd", "sampled", {"llama_b": 0.5}),
                     "chunk_a": ("kd", "xtok_chunk", {"llama_b": 0, "llama_a": 0.5}),
                     "match_a": ("kd", "xtok_match", {"llama_b": 0, "llama_a": 0.5}),
                     "project_a": ("kd", "xtok_project", {"llama_b": 0, "llama_a": 0.5})}
