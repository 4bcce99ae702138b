"""HTMuon inside the Hugging Face Trainer, and the token streams (resumable, masked padding)."""

from __future__ import annotations

import pytest
import torch

from htmuon_dist.training.config import DataArguments


def test_hf_trainer_with_htmuon(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from htmuon_dist import HTMuon, param_groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False))
    # A learnable pattern: every sequence counts upwards.
    starts = torch.randint(0, 32, (64, 1))
    ids = (starts + torch.arange(16)) % 64
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    optimizer = HTMuon(param_groups(model, convention="muon"), lr=0.02, power=0.125, adamw_lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, scheduler))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert inner is optimizer
    q = model.model.layers[0].self_attn.q_proj.weight
    assert optimizer.state[q]["momentum_buffer"].abs().sum() > 0 and int(optimizer.state[q]["step"]) == 30


def _stream(cache_dir, **kw):
    from htmuon_dist.training.data import TokenStream, load_documents, load_tokenizer

    data = DataArguments(cache_dir=str(cache_dir), seq_len=32, **kw)
    tok = load_tokenizer(data)
    docs = load_documents(data, "train", rank=0, world_size=2, seed=0)
    return lambda: TokenStream(docs, tok, data, micro_batch=4, vocab_size=4096, seed=3), tok


@pytest.mark.parametrize("packing", [True, False])
def test_stream_resumes_exactly(cache_dir, packing):
    make, _ = _stream(cache_dir, packing=packing)
    a = make()
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(5)]
    b = make()
    b.load_state_dict(state)
    got = [batch for _, batch in zip(range(5), b)]
    for x, y in zip(expected, got):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_packing_fills_and_reference_mode_masks_padding(cache_dir):
    make, tok = _stream(cache_dir, packing=True)
    batches = [b for _, b in zip(range(20), make())]
    assert all(b["input_ids"].shape == (4, 32) and (b["labels"] != -100).all() for b in batches)
    assert any((b["input_ids"] == tok.eos_token_id).any() for b in batches), "documents are EOS-separated"
    make, tok = _stream(cache_dir, packing=False)
    seen_pad = False
    for _, batch in zip(range(20), make()):
        pad = batch["attention_mask"] == 0
        assert (batch["labels"][pad] == -100).all() and (batch["labels"][~pad] == batch["input_ids"][~pad]).all()
        seen_pad |= bool(pad.any())
    assert seen_pad, "short documents are padded in the reference mode"


def test_offline_corpus_is_real_english_and_cached(cache_dir):
    from htmuon_dist.training.data import offline_corpus

    path = offline_corpus(DataArguments(cache_dir=str(cache_dir)))
    text = (path / "train.jsonl").read_text()
    assert len(text) > 1_000_000 and " the " in text and " return " in text
    assert offline_corpus(DataArguments(cache_dir=str(cache_dir))) == path  # no rebuild
