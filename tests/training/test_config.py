"""Arguments, the reference table, the schedule, and bad input that must fail fast with a
message saying what to change."""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import TINY, launch
from htmuon_dist.training.config import ConfigError, parse_args, resolve
from htmuon_dist.training.optim import lr_lambda


def test_yaml_then_command_line_overrides(tmp_path):
    cfg = parse_args(["--config", "configs/train/tiny_cpu.yaml", "--max_steps", "100", "--optimizer", "muon"])
    assert cfg.model.model == "tiny" and cfg.data.seq_len == 128  # from the YAML
    assert cfg.train.max_steps == 100 and cfg.train.optimizer == "muon"  # overridden
    cfg, accum = resolve(cfg, world_size=2)
    assert accum == 1 and cfg.train.power == 0.0 and cfg.train.spectral_method == "ns5"
    # the YAML leaves warmup to max_steps: a short run needs no --warmup_steps of its own
    assert cfg.train.warmup_steps == 10
    assert resolve(parse_args(["--config", "configs/train/tiny_cpu.yaml"]), world_size=2)[0].train.warmup_steps == 24
    assert resolve(parse_args(["--config", "configs/train/tiny_cpu.yaml", "--max_steps", "3"]), world_size=2)[0].train.warmup_steps == 1


def test_reference_table_defaults():
    cfg, accum = resolve(parse_args(["--model", "60m", "--micro_batch_size", "64"]), world_size=4)
    t = cfg.train
    assert (t.lr, t.max_steps, t.warmup_steps, t.power, t.spectral_method) == (0.03, 10_000, 1_000, 0.125, "eigh")
    assert accum == 2 and t.adamw_lr == 1e-3
    cfg, _ = resolve(parse_args(["--model", "1b", "--optimizer", "adamw", "--micro_batch_size", "16"]), world_size=8)
    assert (cfg.train.lr, cfg.train.max_steps) == (6e-4, 90_000)
    cfg, _ = resolve(parse_args(["--model", "1b", "--optimizer", "htmuon_interval", "--micro_batch_size", "16"]), world_size=8)
    assert (cfg.train.lr, cfg.train.interval) == (5e-3, 5)


def test_schedule_warmup_then_cosine_to_ten_percent():
    f = lr_lambda(warmup=10, total=100, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(99) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 99))


@pytest.mark.parametrize("argv, needle", [
    (["--total_batch_size", "10", "--micro_batch_size", "4"], "not a multiple of micro_batch_size"),
    (["--optimizer", "adamw2"], "did you mean adamw"),
    (["--model", "60m", "--optimizer", "muon", "--power", "0.5"], "power 0"),
    (["--dataset", "json"], "needs --data_files"),
    (["--model", "my_model.json"], "no such file"),
    (["--max_steps", "5", "--warmup_steps", "9"], "--warmup_steps"),
])
def test_bad_arguments_fail_with_a_fix(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        cfg = parse_args(["--micro_batch_size", "4", "--total_batch_size", "8", *argv])
        resolve(cfg, world_size=2)
        from htmuon_dist.training.model import load_llama_config

        load_llama_config(cfg.model)


def test_unknown_yaml_option(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match="did you mean max_steps"):
        parse_args(["--config", str(bad)])


def test_unknown_model_key(tmp_path):
    from htmuon_dist.training.config import ModelArguments
    from htmuon_dist.training.model import load_llama_config

    cfg = json.loads(open("configs/model/tiny.json").read())
    cfg["hidden_sise"] = 64
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hidden_sise' \\(did you mean 'hidden_size'\\?\\)"):
        load_llama_config(ModelArguments(model=str(path)))
    with pytest.raises(ConfigError, match="num_hidden_layer"):
        load_llama_config(ModelArguments(model="tiny", model_overrides='{"num_hidden_layer": 2}'))


def test_model_configs_match_the_reference():
    from htmuon_dist.training.config import ModelArguments
    from htmuon_dist.training.model import count_parameters, load_llama_config

    table = {"60m": (512, 8, 8, 1376), "135m": (768, 12, 12, 2048), "350m": (1024, 24, 16, 2736),
             "1b": (2048, 24, 32, 5461), "7b": (4096, 32, 32, 11008)}
    for name, (h, layers, heads, ffn) in table.items():
        c = load_llama_config(ModelArguments(model=name))
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (h, layers, heads, ffn)
        assert (c.vocab_size, c.hidden_act, c.rms_norm_eps, c.initializer_range, c.tie_word_embeddings) == (32000, "silu", 1e-6, 0.02, False)
    assert count_parameters(load_llama_config(ModelArguments(model="tiny"))) < 3_000_000
    assert 6.5e9 < count_parameters(load_llama_config(ModelArguments(model="7b"))) < 7e9


def test_dataset_without_text_field(cache_dir, tmp_path):
    from htmuon_dist.training.config import DataArguments
    from htmuon_dist.training.data import load_documents

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"content": f"document {i}"}) + "\n" for i in range(40)))
    args = DataArguments(dataset="json", data_files=str(data), cache_dir=str(cache_dir))
    with pytest.raises(ConfigError, match="no column 'text'.*--text_field"):
        load_documents(args, "train", 0, 1, 0)
    args.text_field = "content"
    assert len(load_documents(args, "train", 0, 1, 0)) == 38  # every 20th held out


def test_c4_without_network_fails_fast(cache_dir, tmp_path):
    start = time.perf_counter()
    proc = launch(cache_dir, None, [*TINY, "--dataset", "c4", "--max_steps", "2", "--output_dir", str(tmp_path)], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--dataset c4" in proc.stderr and "--dataset offline" in proc.stderr
    assert time.perf_counter() - start < 60


def test_resume_from_another_models_checkpoint(cache_dir, tmp_path):
    base = [*TINY, "--max_steps", "2", "--save_steps", "2", "--export_model", "false", "--output_dir", str(tmp_path)]
    launch(cache_dir, None, base)
    proc = launch(cache_dir, None, [*base, "--max_steps", "4", "--model_overrides", '{"num_hidden_layers": 2}'], check=False)
    assert proc.returncode == 2
    assert "cannot resume" in proc.stderr and "num_hidden_layers" in proc.stderr and "--output_dir" in proc.stderr


def test_strategy_detection_from_accelerate_env(monkeypatch):
    from htmuon_dist.training.parallel import detect_strategy

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert detect_strategy("auto", 2) == "fsdp2"
    monkeypatch.setenv("FSDP_VERSION", "1")
    assert detect_strategy("auto", 2) == "fsdp1"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert detect_strategy("auto", 2) == "ddp" and detect_strategy("auto", 1) == "none"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cpu_fsdp2.yaml"):
            detect_strategy("auto", 2)
