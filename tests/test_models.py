"""Reference model: exact parameter counts against ModelSpec, shapes, causality, aux loss, config merging;
plus the data module and the SLURM variable mapping (all single-process)."""
import os

import pytest
import torch

from piper_ds.config import merge_moe_with_model, parse_piper_config
from piper_ds.data import (ByteBatches, RandomTokens, TokenBatches, list_files, load_corpus, make_batches,
                           make_text_batches, stdlib_root)
from piper_ds.models import build_model
from piper_ds.system.specs import ModelSpec

SPECS = {
    "tiny": ModelSpec.preset("tiny"),
    "gqa_dense_shared_untied": ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, n_shared_experts=2,
                                                n_kv_heads=2),
    "gelu_tied_headdim": ModelSpec.preset("tiny", activation="gelu", tie_embeddings=True, head_dim=8,
                                          d_ffn_dense=40, n_dense_layers=1, num_experts=6, top_k=3),
    "all_dense": ModelSpec.preset("tiny", n_layers=2, n_dense_layers=2),
    "mha_wide_vocab": ModelSpec(vocab_size=300, d_model=48, n_layers=2, n_heads=6, n_kv_heads=3, seq_len=16,
                                num_experts=8, top_k=2, d_ffn_expert=24, n_shared_experts=1),
}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("stock", [False, True], ids=["piper", "stock"])
def test_param_counts_equal_spec(name, stock):
    spec = SPECS[name]
    model = build_model(spec, ep_size=1, stock_moe=stock, seed=0)
    want = spec.param_counts()
    got = model.param_counts()
    for key in got:
        assert got[key] == want[key], (key, got[key], want[key])
    assert sum(p.numel() for p in model.parameters()) == want["total"]


def test_param_counts_with_ep_count_global_experts():
    spec = SPECS["gqa_dense_shared_untied"]
    model = build_model(spec, ep_size=2, seed=0)  # not bound to a group: holds E/2 experts per layer
    assert model.param_counts() == {k: v for k, v in spec.param_counts().items() if k in model.param_counts()}
    local = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert local * 2 == spec.param_counts()["experts"]


def test_preset_by_name_and_block():
    a = build_model("tiny", seed=0)
    b = build_model({"preset": "tiny"}, seed=0)
    assert a.spec == b.spec
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_forward_shapes_aux_and_loss():
    spec = SPECS["gqa_dense_shared_untied"]
    model = build_model(spec, {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}, seed=0)
    ids = torch.randint(0, spec.vocab_size, (3, spec.seq_len))
    logits, aux = model(ids)
    assert logits.shape == (3, spec.seq_len, spec.vocab_size)
    assert aux.dtype == torch.float32 and aux.ndim == 0 and aux.item() > 0
    loss = model.loss(logits, ids)
    (loss + aux).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    _, aux_eval = model(ids)
    assert aux_eval.item() == 0.0  # no balancing loss outside training


def test_causal_future_tokens_do_not_change_past_logits():
    spec = SPECS["mha_wide_vocab"]
    model = build_model(spec, seed=0).eval()
    ids = torch.randint(0, spec.vocab_size, (2, spec.seq_len))
    changed = ids.clone()
    changed[:, -3:] = (changed[:, -3:] + 1) % spec.vocab_size
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :-3], b[:, :-3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_layers_are_a_flat_sequence():
    spec = SPECS["gqa_dense_shared_untied"]
    model = build_model(spec, seed=0).eval()
    layers = model.layers()
    assert len(layers) == spec.n_layers + 2
    ids = torch.randint(0, spec.vocab_size, (2, 8))
    out = ids
    with torch.no_grad():
        for layer in layers:
            out = layer(out)
        ref, _ = model(ids)
    torch.testing.assert_close(out[0], ref)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """Each block recomputed in backward (non-reentrant): identical loss and every gradient, fp64."""
    spec = ModelSpec.preset("tiny", n_layers=3, n_dense_layers=1, n_shared_experts=1, seq_len=8, vocab_size=64)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    runs = []
    for recompute in (False, True):
        model = build_model(spec, {"kernels": "reference", "aux_loss_coef": 0.01}, seed=3,
                            activation_checkpointing=recompute).double()
        logits, aux = model(ids)
        loss = model.loss(logits, torch.roll(ids, -1, 1)) + aux
        loss.backward()
        runs.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = runs
    assert loss0 == loss1
    assert grads0.keys() == grads1.keys() and all(g is not None for g in grads0.values())
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-12, msg=name)


def test_too_long_input_and_bad_ep_are_errors():
    model = build_model("tiny", seed=0)
    with pytest.raises(ValueError, match="more than seq_len"):
        model(torch.zeros(1, model.spec.seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"num_experts \(4\).*ep_size \(3\)"):
        build_model("tiny", ep_size=3)


def test_moe_block_conflicting_with_model_is_an_error():
    with pytest.raises(ValueError, match=r"piper.moe.top_k \(3\) contradicts piper.model.top_k \(2\)"):
        parse_piper_config({"piper": {"model": {"preset": "tiny"}, "moe": {"top_k": 3}}})
    merged = merge_moe_with_model(ModelSpec.preset("tiny", n_shared_experts=1), {"aux_loss_coef": 0.1})
    assert (merged.top_k, merged.n_shared_experts, merged.aux_loss_coef) == (2, 1, 0.1)


# ------------------------------------------------------------------------------------------------- data
def test_stdlib_corpus_is_deterministic_with_fixed_split():
    files = list_files(stdlib_root(), ".py")
    assert files and all("site-packages" not in f for f in files)
    assert files == list_files(stdlib_root(), ".py")
    train, val = load_corpus(None, 0.05, 2 * 2**20)
    train2, val2 = load_corpus(None, 0.05, 2 * 2**20)
    assert torch.equal(train, train2) and torch.equal(val, val2)
    assert 0.02 < val.numel() / (train.numel() + val.numel()) < 0.1


def test_user_file_and_folder(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog\n" * 200).encode()
    f = tmp_path / "one.txt"
    f.write_bytes(text)
    train, val = load_corpus(str(f), 0.1)
    assert train.numel() + val.numel() == len(text) and bytes(val.tolist()) == text[-val.numel():]
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_bytes(text)
    train, val = load_corpus(str(folder), 0.1)
    assert val.numel() == 4 * len(text)
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        load_corpus(str(tmp_path / "missing"))


def test_batches_are_a_function_of_step_micro_rank():
    data = make_batches(None, 256, 32, 4, seed=7, max_bytes=2**20)
    assert isinstance(data, ByteBatches)
    x, y = data.get("train", 5, 0, 1)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, data.get("train", 5, 0, 1)[0])
    assert not torch.equal(x, data.get("train", 5, 0, 0)[0])
    assert not torch.equal(x, data.get("train", 6, 0, 1)[0])
    rnd = make_batches("random", 1000, 16, 2, seed=1)
    assert isinstance(rnd, RandomTokens) and rnd.get("train", 0, 0, 0)[0].max() < 1000
    with pytest.raises(ValueError, match=r"vocab_size >= 256.*100"):
        make_batches(None, 100, 16, 2, seed=1)


def test_text_batches_use_the_models_tokenizer(tmp_path):
    """make_text_batches: the corpus through a tokenizer (here: one token per word, by length), windows of its ids;
    ids outside the model's vocabulary are an error."""
    f = tmp_path / "text.txt"
    f.write_text("alpha beta gamma delta epsilon " * 400)
    encode = lambda text: [len(word) for word in text.split()]  # noqa: E731
    data = make_text_batches(str(f), encode, vocab_size=8, seq_len=16, micro_batch=2, seed=3)
    x, y = data.get("train", 0, 0, 0)
    assert isinstance(data, TokenBatches) and data.vocab_size == 8 and x.shape == (2, 16)
    assert set(x.flatten().tolist()) <= {4, 5, 7} and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match=r"token ids in \[4, 7\], outside the model's vocabulary of 6"):
        make_text_batches(str(f), encode, vocab_size=6, seq_len=16, micro_batch=2, seed=3)


# ------------------------------------------------------------------------------------------------ SLURM
def test_slurm_variables_map_to_torch_distributed():
    from piper_ds.api import env_from_slurm
    env = env_from_slurm({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu[07-08,11]", "SLURM_TASKS_PER_NODE": "4(x2)"})
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert env_from_slurm({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a1,b2"})["MASTER_ADDR"] == "a1"
    assert env_from_slurm({"RANK": "0", "SLURM_PROCID": "3"}) == {}  # a launcher already set the ranks
    assert env_from_slurm(dict(os.environ) if "SLURM_PROCID" not in os.environ else {}) == {}


# ------------------------------------------------------------------------------------------ expert load
def test_expert_load_counter_piper_and_stock_dropped():
    from piper_ds.tracking import ExpertLoadCounter
    spec = SPECS["mha_wide_vocab"]
    ids = torch.randint(0, spec.vocab_size, (4, spec.seq_len))
    for stock in (False, True):
        moe = {"capacity_factor": 1.0} if not stock else {}
        model = build_model(spec, moe, stock_moe=stock, seed=0)
        counter = ExpertLoadCounter(model)
        model(ids)
        model(ids)
        counts, dropped, assigned = counter.collect()
        T, k = ids.numel(), spec.top_k
        assert counts.shape == (spec.n_moe_layers, spec.num_experts) and counts.sum() == 2 * 2 * T * k
        assert assigned == 2 * 2 * T * k
        # the same drops, counted independently: PiperMoE's own stats / stock gate's dispatch mask
        want = 0
        for layer in model.moe_layers():
            x = torch.randn(T, spec.d_model)
            if stock:
                layer.deepspeed_moe.gate.top2_2nd_expert_sampling = False  # stock top-2 samples its 2nd expert
                _, _, dispatch_mask, _ = layer.deepspeed_moe.gate(x)
                layer(x)
                want += T * k - int(dispatch_mask.sum())
            else:
                layer(x)
                want += int(layer.last_stats["dropped"])
        counts2, dropped2, _ = counter.collect()
        assert dropped2 == want and want > 0, (stock, dropped2, want)
        summary = ExpertLoadCounter.summary(counts, dropped, assigned)
        assert summary["load_max_over_mean"] >= summary["load_max_over_mean_avg"] >= 1.0
        counter.remove()
