"""``--optimizer`` name -> HTMuon keyword arguments (a pure function), the config checks of the
reference's variants, and ``htmuon-train --help`` listing every optimizer."""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.training.config import OPTIMIZERS, ConfigError, parse_args, resolve
from htmuon_dist.training.optim import htmuon_kwargs

BASE = ["--model", "60m", "--micro_batch_size", "64"]

# name -> (method, power, interval, normuon)
EXPECTED = {
    "htmuon": ("eigh", 0.125, None, False),
    "htmuon_interval": ("eigh", 0.125, 5, False),
    "htmuon_stream": ("stream", 0.125, None, False),
    "htmuon_ns": ("ns_roots", 0.125, None, False),
    "htmuon_ht": ("ht", 0.125, None, False),
    "muon": ("ns5", 0.0, None, False),
    "normuon": ("ns5", 0.0, None, True),
    "htnormuon": ("eigh", 0.125, None, True),
    "htnormuon_interval": ("eigh", 0.125, 5, True),
}


def _resolved(*argv: str):
    cfg, _ = resolve(parse_args([*BASE, *argv]), world_size=8)
    return cfg.train


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_optimizer_name_maps_to_htmuon_kwargs(name: str) -> None:
    t = _resolved("--optimizer", name, "--normuon_beta2", "0.9")
    kw = htmuon_kwargs(t)
    method, power, interval, normuon = EXPECTED[name]
    assert (kw["method"], kw["power"], kw["interval"]) == (method, power, interval)
    assert kw.get("normuon", False) is normuon
    assert kw.get("normuon_beta2") == (0.9 if normuon else None)
    assert "adjust_lr_fn" not in kw  # unset: HTMuon's own default
    assert kw["adamw_weight_decay"] == 0.0 and kw["adamw_eps"] == 1e-10 and kw["nesterov"] is True
    # Muon-family lr from the table's Muon column, the others from HTMuon's
    assert kw["lr"] == (0.01 if name in ("muon", "normuon") else 0.03)


def test_every_optimizer_is_accepted_and_adamw_is_not_htmuon() -> None:
    assert set(EXPECTED) | {"adamw"} == set(OPTIMIZERS)
    with pytest.raises(ValueError, match="does not use HTMuon"):
        htmuon_kwargs(_resolved("--optimizer", "adamw"))


def test_adjust_lr_fn_and_adamw_weight_decay_are_passed() -> None:
    t = _resolved("--optimizer", "htmuon", "--adjust_lr_fn", "match_rms_adamw", "--adamw_weight_decay", "0.1")
    kw = htmuon_kwargs(t)
    assert kw["adjust_lr_fn"] == "match_rms_adamw" and kw["adamw_weight_decay"] == 0.1
    assert kw["lr"] == 1e-3  # an AdamW lr carries over under match_rms_adamw
    assert htmuon_kwargs(_resolved("--adjust_lr_fn", "original"))["adjust_lr_fn"] == "original"


@pytest.mark.parametrize("argv, needle", [
    (["--optimizer", "htmuon_ns", "--power", "0.2"], r"2\^-k"),
    (["--optimizer", "htmuon_ht", "--spectral_method", "eigh"], "uses spectral method 'ht'"),
    (["--optimizer", "normuon", "--power", "0.125"], "use --optimizer htnormuon"),
    (["--adjust_lr_fn", "match_rms"], "did you mean match_rms_adamw"),
    (["--param_dtype", "fp16"], "--param_dtype"),
    (["--spectral_method", "qr"], "unknown spectral method"),
    (["--power", "1.5"], "--power must be in"),
])
def test_bad_variant_arguments_fail_with_a_fix(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _resolved(*argv)


def test_help_lists_every_optimizer(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in OPTIMIZERS:
        assert name in out, name
    assert "--adjust_lr_fn" in out and "--param_dtype" in out


@pytest.mark.parametrize("name", ["htmuon_ns", "htmuon_ht", "htmuon", "htmuon_stream", "normuon",
                                  "htnormuon", "htnormuon_interval"])
def test_variant_optimizers_build_and_step(name: str) -> None:
    """Every HTMuon-family name builds HTMuon from its kwargs and steps; the NorMuon family
    keeps its per-row state (one float32 value per row)."""
    from htmuon_dist import HTMuon

    t = _resolved("--optimizer", name)
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24, bias=False)
    opt = HTMuon([{"params": [layer.weight], "htmuon": True}], **htmuon_kwargs(t))
    layer(torch.randn(8, 16)).square().sum().backward()
    before = layer.weight.detach().clone()
    opt.step()
    assert torch.isfinite(layer.weight).all() and not torch.equal(before, layer.weight)
    v = opt.state[layer.weight].get("normuon_v")
    assert (v is not None) == EXPECTED[name][3]
    basis = opt.state[layer.weight].get("method_state")  # the stream basis: float32, like the weight
    assert (basis is not None) == (name == "htmuon_stream")
    if basis is not None:
        assert basis.shape == layer.weight.shape and basis.dtype == torch.float32 and basis.any()
    if v is not None:
        assert v.shape == (24,) and v.dtype == torch.float32 and bool((v > 0).all())


def test_pure_bf16_parameters_train(cache_dir, tmp_path) -> None:
    """--param_dtype bf16 (c4_reference.yaml's setting): the parameters are bf16 and the loss is
    finite over a few steps, with the reference's clipping off and AdamW-group weight decay."""
    import json

    from conftest import TINY, launch

    out = tmp_path / "bf16"
    launch(cache_dir, None, [*TINY, "--max_steps", "3", "--param_dtype", "bf16", "--grad_clip", "0",
                             "--adamw_weight_decay", "0.1", "--output_dir", str(out), "--export_model", "false",
                             "--save_steps", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["param_dtypes"] == ["bfloat16"] and summary["step"] == 3
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_htnormuon_trains_in_the_trainer(cache_dir, tmp_path) -> None:
    """--optimizer htnormuon through launch/train.py: the loss is finite and goes down."""
    import json

    from conftest import TINY, launch

    out = tmp_path / "htnormuon"
    launch(cache_dir, None, [*TINY, "--max_steps", "4", "--optimizer", "htnormuon", "--output_dir", str(out),
                             "--export_model", "false", "--save_steps", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_c4_reference_yaml_has_the_reference_settings() -> None:
    cfg, accum = resolve(parse_args(["--config", "configs/train/c4_reference.yaml", "--model", "135m"]), world_size=4)
    t = cfg.train
    assert (t.weight_decay, t.adamw_weight_decay, t.grad_clip, t.param_dtype) == (0.1, 0.1, 0.0, "bf16")
    assert (t.total_batch_size, cfg.data.seq_len, cfg.data.packing, t.min_lr_ratio) == (512, 256, False, 0.1)
    assert (t.lr, t.max_steps, t.warmup_steps, t.power) == (0.03, 20_000, 2_000, 0.125) and accum == 2
    assert htmuon_kwargs(t)["adamw_weight_decay"] == 0.1


@pytest.mark.parametrize("method,power", [("ns_roots", 0.125), ("ht", 0.125), ("stream", 0.125)])
def test_normuon_combines_with_the_other_variants_through_spectral_method(method: str, power: float) -> None:
    """The reference's htmuon_normuon_ns / _ht / _stream: ``--optimizer htnormuon --spectral_method X``."""
    kw = htmuon_kwargs(_resolved("--optimizer", "htnormuon", "--spectral_method", method))
    assert (kw["method"], kw["power"], kw["normuon"]) == (method, power, True)


@pytest.mark.parametrize("optimizer", ["htmuon", "htnormuon"])
def test_fast_ns_is_accepted_as_spectral_method(optimizer: str) -> None:
    """``--spectral_method fast_ns`` reaches HTMuon (and NorMuon on it) like any registered method."""
    kw = htmuon_kwargs(_resolved("--optimizer", optimizer, "--spectral_method", "fast_ns"))
    assert kw["method"] == "fast_ns" and kw["power"] == 0.125
    assert kw.get("normuon", False) is (optimizer == "htnormuon")


def test_comm_dtype_reaches_htmuon_and_bad_values_name_the_choices() -> None:
    """``--comm_dtype bf16``: HTMuon exchanges (and its spectral methods see) bf16 momentum, the
    regime log_ns/auto on GPUs is priced in; the default keeps the momentum's own dtype."""
    from htmuon_dist.training.validate import check_ranges

    assert htmuon_kwargs(_resolved())["comm_dtype"] is None
    assert htmuon_kwargs(_resolved("--comm_dtype", "bf16"))["comm_dtype"] is torch.bfloat16
    assert htmuon_kwargs(_resolved("--optimizer", "muon", "--comm_dtype", "fp32"))["comm_dtype"] is torch.float32
    for argv, needle in ((["--comm_dtype", "fp16"], "--comm_dtype must be one of none, bf16, fp32, got 'fp16'"),
                         (["--optimizer", "adamw", "--comm_dtype", "bf16"], "adamw has no exchange")):
        cfg, _ = resolve(parse_args([*BASE, *argv]), world_size=8)
        with pytest.raises(ConfigError, match=needle):
            check_ranges(cfg)


def test_comm_dtype_bf16_rounds_what_the_owner_sees() -> None:
    """One process: with --comm_dtype bf16 the step is the exact method on the bf16-rounded
    momentum with bf16's noise cutoff (to the bf16 rounding of the update, which travels back
    in the wire dtype too); the default is the fp32 momentum with fp32's cutoff, exactly."""
    from htmuon_dist import HTMuon
    from htmuon_dist.spectral import default_rtol, spectral_power

    torch.manual_seed(0)
    grad = torch.randn(48, 32) * torch.logspace(0, -3, 32)  # singular values down to ~1e-3: cutoffs differ
    # the first step's Nesterov momentum (htmuon_dist.functional): B = lerp(0, G, 0.05), M = lerp(G, B, 0.95)
    nest = torch.lerp(grad, torch.lerp(torch.zeros_like(grad), grad, 0.05), 0.95)
    lr = _resolved().lr

    def want(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rtol = default_rtol(dtype, (48, 32))
        return -lr * 1.5 ** 0.5 * spectral_power(data, 0.125, method="eigh", rtol=rtol)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    steps = {}
    for name in ("none", "bf16"):
        w = torch.nn.Parameter(torch.zeros(48, 32))
        opt = HTMuon([{"params": [w], "htmuon": True}], **htmuon_kwargs(_resolved("--comm_dtype", name,
                                                                                  "--weight_decay", "0")))
        w.grad = grad.clone()
        opt.step()
        steps[name] = w.detach()
    assert rel(steps["none"], want(nest, torch.float32)) <= 1e-6
    rounded = nest.to(torch.bfloat16).float()
    assert rel(steps["bf16"], want(rounded, torch.bfloat16)) <= 4e-3  # measured 1.7e-3
    assert rel(steps["bf16"], want(nest, torch.float32)) > 0.1  # measured 0.35: the cutoff moved


def test_the_trainer_notes_fp32_momentum_under_a_16_bit_method_on_gpus() -> None:
    """On CUDA, auto/log_ns/fast_ns on fp32 momentum get a one-line note naming --comm_dtype bf16;
    bf16 states, a bf16 wire, the exact methods and the CPU get none."""
    from htmuon_dist.training.loop import momentum_dtype_note

    note = momentum_dtype_note(_resolved("--spectral_method", "auto"), "cuda")
    assert note is not None and "--comm_dtype bf16" in note and "--spectral_method auto" in note
    assert momentum_dtype_note(_resolved("--spectral_method", "log_ns"), "cuda") is not None
    for argv, device in ((["--spectral_method", "auto"], "cpu"),
                         (["--spectral_method", "auto", "--comm_dtype", "bf16"], "cuda"),
                         (["--spectral_method", "log_ns", "--param_dtype", "bf16"], "cuda"),
                         (["--spectral_method", "eigh"], "cuda"),
                         (["--optimizer", "muon"], "cuda"),
                         (["--optimizer", "adamw"], "cuda")):
        assert momentum_dtype_note(_resolved(*argv), device) is None, argv


def test_matrix_shape_counts_cut_experts_and_fused_blocks() -> None:
    """HTMuon's matrices as the announcement counts them: a 3-D expert stack per expert, a fused
    gate/up projection per row block, plain weights whole; unrouted parameters not at all."""
    from htmuon_dist.training.optim import matrix_shape_counts

    model = torch.nn.Module()
    model.experts = torch.nn.Parameter(torch.zeros(4, 24, 16))  # 4 experts of (24, 16)
    model.gate_up = torch.nn.Parameter(torch.zeros(48, 16))  # two (24, 16) blocks
    model.down = torch.nn.Parameter(torch.zeros(16, 24))
    model.norm = torch.nn.Parameter(torch.zeros(16))
    splits = {"gate_up": {"row_blocks": (24, 24)}}
    got = matrix_shape_counts(model, {"experts", "gate_up", "down"}, splits)
    assert got == {(24, 16): 6, (16, 24): 1}


def test_the_trainer_says_what_auto_resolves_to() -> None:
    """--spectral_method auto: one line of methods per device and power, then why (the rule's
    clause per shape on CUDA without a measured table; one reason when all agree)."""
    from htmuon_dist.training.loop import auto_choice_lines

    shapes = {(2048, 2048): 64, (5461, 2048): 32}
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    lines = auto_choice_lines(_resolved("--spectral_method", "auto", "--power", "0.0625"), cuda, shapes)
    assert lines[0] == ("--spectral_method auto on cuda at power 0.0625: log_ns for 32 x 5461x2048; "
                        "eigh for 64 x 2048x2048")
    assert "5461x2048: rule" in lines[1] and "m/n >= 2" in lines[1]
    assert "2048x2048: rule" in lines[2] and "near square at p < 0.125" in lines[2]
    lines = auto_choice_lines(_resolved("--spectral_method", "auto"), cuda, shapes)  # p = 1/8
    assert lines[0].endswith("log_ns for 32 x 5461x2048, 64 x 2048x2048") and len(lines) == 3  # largest first
    lines = auto_choice_lines(_resolved("--spectral_method", "auto"), torch.device("cpu"), {(512, 512): 3})
    assert lines[0].endswith("eigh for 3 x 512x512")  # the shipped CPU table measured 512x512
    assert lines[1] == '  why: measured at 512x512, p = 0.125 on \'cpu\': ' + lines[1].split(": ", 2)[2]
    for argv in (["--spectral_method", "eigh"], ["--optimizer", "adamw"]):
        assert auto_choice_lines(_resolved(*argv), cuda, shapes) == [], argv
