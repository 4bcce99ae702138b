"""Expert stacks and split fused projections equal separate 2-D parameters (transformers
Mixtral and Phi-3, single process and FSDP2 at W = 2, 3 on gloo).

Tolerance: 0 in one process (the same arithmetic), 2e-5 relative sharded after 3 steps (FSDP2
sums the gradients in another order; measured 4e-6..1.1e-5)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import moe_workers as mw
from htmuon_dist import HTMuon, param_groups
from multirank import run_ranks

STEPS, BATCH, TOL = 3, 6, 2e-5


def _worst(got, want):
    assert set(got) == set(want), set(got) ^ set(want)
    return max(float((got[n].double() - want[n].double()).norm() / want[n].double().norm()) for n in want)


@pytest.fixture(scope="module")
def want():
    return {kind: mw.reference(kind, STEPS, BATCH) for kind in ("mixtral", "phi3")}


def test_one_matrix_per_expert_and_block_in_one_process(want):
    model = mw.tiny_mixtral()
    opt = mw.train(model, mw.batches(STEPS, BATCH), process_group=None)
    names = opt.engine.names
    assert "model.layers.0.mlp.experts.gate_up_proj[3].rows[12:24]" in names
    assert "model.layers.1.mlp.experts.down_proj[0]" in names
    assert sum("experts" in n for n in names) == 2 * mw.EXPERTS * 3
    assert opt.engine.shapes[names.index("model.layers.0.mlp.experts.gate_up_proj[0].rows[0:12]")] == (mw.INTER, mw.HIDDEN)
    assert _worst(mw.stacked_state(model), want["mixtral"]) <= 1e-6


def test_the_whole_stack_as_one_matrix_is_not_the_per_expert_update(want):
    """The check above can fail: (E, 2I, H) viewed as one (E, 2I*H) matrix is another update."""
    model = mw.tiny_mixtral()
    groups = [dict(g, stack_dims=0, row_blocks=None) if g["htmuon"] else g for g in param_groups(model)]
    opt = HTMuon(groups, **mw.OPT, process_group=None)
    for x in mw.batches(STEPS, BATCH):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert _worst(mw.stacked_state(model), want["mixtral"]) > 1e-2


def test_split_fused_projections_equal_separate_ones_in_one_process(want):
    model = mw.tiny_phi3()
    opt = mw.train(model, mw.batches(STEPS, BATCH), process_group=None)
    assert "model.layers.0.self_attn.qkv_proj.weight.rows[24:32]" in opt.engine.names
    assert _worst(mw.stacked_state(model), want["phi3"]) <= 1e-6
    fused = mw.tiny_phi3()
    opt = HTMuon(param_groups(fused, split_fused=False), **mw.OPT, process_group=None)
    for x in mw.batches(STEPS, BATCH):
        fused(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert _worst(mw.stacked_state(fused), want["phi3"]) > 1e-2


@pytest.mark.multirank
@pytest.mark.parametrize("kind,world", [("mixtral", 2), ("mixtral", 3), ("phi3", 2)])
def test_fsdp2_stacks_and_blocks_equal_separate_parameters(want, kind, world):
    results = run_ranks(mw.sharded, world, kind, STEPS, BATCH)
    for r in results:
        assert _worst(r["params"], want[kind]) <= TOL
    # every rank owns some matrix: experts / blocks are balanced like any other matrix
    assert sorted(set(results[0]["owners"])) == list(range(world))


def _groups_of(model, **kw):
    return {(g.get("stack_dims"), g.get("row_blocks")): [n.split("layers.", 1)[-1] for n in g["param_names"]]
            for g in param_groups(model, **kw) if g["htmuon"]}, \
        [n for g in param_groups(model, **kw) if not g["htmuon"] for n in g["param_names"]]


def test_param_groups_for_the_model_families():
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4)
    groups, adamw = _groups_of(mw.tiny_mixtral())
    assert groups[(1, (12, 12))] == ["0.mlp.experts.gate_up_proj", "1.mlp.experts.gate_up_proj"]
    assert groups[(1, None)] == ["0.mlp.experts.down_proj", "1.mlp.experts.down_proj"]
    assert "model.layers.0.mlp.gate.weight" in adamw  # the router, by default
    groups, adamw = _groups_of(mw.tiny_mixtral(), router="htmuon")
    assert "0.mlp.gate.weight" in groups[(None, None)]
    qwen = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**small, moe_intermediate_size=12, num_key_value_heads=2,
                                                  num_experts=4, head_dim=4))
    assert _groups_of(qwen)[0][(1, (12, 12))] == ["0.mlp.experts.gate_up_proj"]
    oss = T.GptOssForCausalLM(T.GptOssConfig(**small, num_key_value_heads=2, num_local_experts=4, head_dim=4))
    groups, adamw = _groups_of(oss)
    assert groups[(1, None)] == ["0.mlp.experts.gate_up_proj", "0.mlp.experts.down_proj"]  # columns interleaved
    assert {"model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.0.mlp.router.weight"} <= set(adamw)
    groups, _ = _groups_of(mw.tiny_phi3())
    assert groups[(None, (16, 8, 8))] == ["0.self_attn.qkv_proj.weight", "1.self_attn.qkv_proj.weight"]
    assert groups[(None, (12, 12))] == ["0.mlp.gate_up_proj.weight", "1.mlp.gate_up_proj.weight"]
    assert _groups_of(mw.tiny_phi3(), split_heads=True)[0][(None, (4,) * 8)][0] == "0.self_attn.qkv_proj.weight"
    neox = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small))
    assert (None, (4,) * 12) in _groups_of(neox)[0]  # [q_h; k_h; v_h] per head: per head and projection
    falcon = T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=4, multi_query=True))
    assert (None, (16, 4, 4)) in _groups_of(falcon)[0]
    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 5), torch.nn.Conv2d(4, 2, 3))
    assert _groups_of(conv)[0] == {(0, None): ["0.weight", "1.weight"]}


def test_trainer_builds_the_moe_config_with_per_expert_groups():
    from types import SimpleNamespace

    from htmuon_dist.training.model import build_model, count_parameters, init_weights_, load_llama_config
    from htmuon_dist.training.optim import build_optimizer, matrix_names, matrix_splits

    cfg = load_llama_config(SimpleNamespace(model="moe_tiny", model_overrides='{"num_hidden_layers": 1}'))
    model = build_model(cfg, on_meta=False, activation_checkpointing=False)
    assert type(model).__name__ == "MixtralForCausalLM" and cfg.num_local_experts == 4
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    init_weights_(model, seed=0, std=0.02)
    assert float(model.model.layers[0].mlp.experts.gate_up_proj.std()) == pytest.approx(0.02, rel=0.1)
    t = SimpleNamespace(optimizer="htmuon", lr=0.05, power=0.125, momentum=0.95, weight_decay=0.1,
                        spectral_method="eigh", interval=None, adamw_lr=3e-3, adamw_weight_decay=0.0,
                        nonfinite="raise", nonfinite_patience=10, logging_steps=10, normuon_beta2=0.95, adjust_lr_fn=None,
                        comm_dtype="none")
    routed = matrix_names(model, "reference")
    assert "model.layers.0.mlp.gate.weight" not in routed  # the router: AdamW by default
    opt = build_optimizer(model, t, routed, matrix_splits(model, "reference"))
    expert_groups = [g for g in opt.param_groups if g["htmuon"] and g["stack_dims"] == 1]
    assert {g["row_blocks"] for g in expert_groups} == {(176, 176), None}
