"""Mixture-of-experts layers in one process: routing, the auxiliary losses, capacity and the expert
bias against formulas written here; one expert equals the dense MLP; the auxiliary losses' gradient;
activation checkpointing; statistics; configuration mistakes."""

from __future__ import annotations

import math

import pytest
import torch

from llm.config import ConfigError, ModelConfig, load_config, validate_world
from llm.model.gpt import build_model
from llm.model.moe import (
    expert_capacity,
    load_balancing_loss,
    moe_layers,
    moe_metrics,
    route,
    sort_by_expert,
    sum_into_tokens,
    update_expert_bias,
    z_loss,
)
from llm.parallel.process_groups import ParallelContext

VOCAB = 200


def _cfg(arch: str = "llama", **kw) -> ModelConfig:
    base = dict(architecture=arch, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                vocab_size=VOCAB, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24)  # fmt: skip
    return ModelConfig(**{**base, **kw})


def _record_router_logits(layer: torch.nn.Module) -> list[torch.Tensor]:
    """The router logits of every forward of an MoE layer, computed here from its input (T, E)."""
    seen: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        seen.append(x.reshape(-1, x.shape[-1]).float() @ module.router.weight.float().t())

    layer.register_forward_pre_hook(hook)
    return seen


def _tokens(b: int = 3, s: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


# ---- routing against the formulas -----------------------------------------------------------------
def test_softmax_routing_normalises_the_chosen_scores() -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    scores, chosen, weights = route(logits, topk=2, score="softmax")
    for t in range(7):
        probs = [math.exp(v) / sum(math.exp(u) for u in logits[t].tolist()) for v in logits[t].tolist()]
        best = sorted(range(5), key=lambda e: -probs[e])[:2]
        assert set(chosen[t].tolist()) == set(best)
        for j, e in enumerate(chosen[t].tolist()):
            assert weights[t, j].item() == pytest.approx(probs[e] / (probs[best[0]] + probs[best[1]]), rel=1e-5)
        assert scores[t].tolist() == pytest.approx(probs, rel=1e-5)


def test_sigmoid_routing_and_the_expert_bias_choose_but_do_not_weigh() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, -5.0, 5.0])  # steers the choice to experts 1 and 3
    _, chosen, weights = route(logits, topk=2, score="sigmoid", bias=bias)
    assert sorted(chosen[0].tolist()) == [1, 3]
    s1, s3 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(1.0))
    got = dict(zip(chosen[0].tolist(), weights[0].tolist()))
    assert got[1] == pytest.approx(s1 / (s1 + s3), rel=1e-6) and got[3] == pytest.approx(s3 / (s1 + s3), rel=1e-6)


def test_load_balancing_loss_and_z_loss_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(12, 4, generator=gen)
    scores, chosen, _ = route(logits, topk=2, score="softmax")
    e, k, t = 4, 2, 12

    def switch(rows: range) -> float:  # E * sum_e f_e P_e, f_e over the token copies, P_e the mean score
        f = [sum(e_ in chosen[i].tolist() for i in rows) / (len(rows) * k) for e_ in range(e)]
        p = [sum(scores[i, e_].item() for i in rows) / len(rows) for e_ in range(e)]
        return e * sum(a * b for a, b in zip(f, p))

    assert load_balancing_loss(scores, chosen, num_experts=e).item() == pytest.approx(switch(range(t)), rel=1e-5)
    per_sequence = (switch(range(0, 6)) + switch(range(6, 12))) / 2  # DeepSeek-V3: within each sequence
    assert load_balancing_loss(scores, chosen, num_experts=e, sequences=2).item() == pytest.approx(per_sequence, rel=1e-5)
    even = torch.zeros(8, 4)  # equal scores, every expert chosen equally often: exactly 1
    assert load_balancing_loss(torch.full((8, 4), 0.25), torch.tensor([[0, 1], [2, 3]] * 4), num_experts=4).item() == 1.0
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert z_loss(logits).item() == pytest.approx(sum(x * x for x in lse) / t, rel=1e-5)
    assert z_loss(even).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


def test_capacity_keeps_each_experts_highest_weighted_copies() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 4, generator=gen) + torch.tensor([2.0, 0.0, 0.0, -2.0])  # expert 0 popular
    _, chosen, weights = route(logits, topk=2, score="softmax")
    cfg = _cfg(num_experts=4, moe_router_topk=2, moe_expert_capacity_factor=1.0)
    capacity = expert_capacity(20, cfg)
    assert capacity == math.ceil(1.0 * 20 * 2 / 4)
    order, counts = sort_by_expert(chosen, weights, num_experts=4, capacity=capacity)
    kept, dropped = set(order.tolist()), 0
    for e in range(4):  # counted here: the copies routed to e, best first; those beyond the capacity go
        copies = sorted(
            (i for i in range(40) if chosen.flatten()[i] == e), key=lambda i: -weights.flatten()[i].item()
        )
        assert set(copies[:capacity]) <= kept and not set(copies[capacity:]) & kept
        assert counts[e].item() == min(len(copies), capacity)
        dropped += max(0, len(copies) - capacity)
    assert dropped > 0 and len(kept) == 40 - dropped
    experts = chosen.flatten()[order]
    assert torch.equal(experts, experts.sort().values)  # grouped by expert, as dispatch expects
    dropless, all_counts = sort_by_expert(chosen, weights, num_experts=4, capacity=None)
    assert sorted(dropless.tolist()) == list(range(40)) and all_counts.sum().item() == 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summing_the_copies_into_their_tokens_is_index_add_keeping_only_the_index(dtype: torch.dtype) -> None:
    """The weighted copies' sum into their tokens: index_add's values and gradient, bit for bit, but
    autograd keeps only the index (its own index_add keeps the copies too); a token whose copies were
    all dropped gets zeros."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(11, 8, generator=g).to(dtype).requires_grad_(True)
    token_of = torch.tensor([0, 0, 1, 3, 3, 4, 4, 5, 5, 6, 6])  # token 2 kept no copy
    upstream = torch.randn(7, 8, generator=g).to(dtype)
    want = torch.zeros(7, 8, dtype=dtype).index_add(0, token_of, rows)
    (want_grad,) = torch.autograd.grad(want, rows, upstream)
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        got = sum_into_tokens(rows, token_of, 7)
    (got_grad,) = torch.autograd.grad(got, rows, upstream)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad) and not got[2].any()
    assert len(kept) == 1 and kept[0] is token_of


# ---- the layer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_expert_top1_is_the_dense_mlp(arch: str) -> None:
    dense_cfg = _cfg(arch, num_experts=None, ffn_hidden_size=24)
    moe_cfg = _cfg(arch, num_experts=1, moe_router_topk=1, moe_aux_loss_coeff=0.0)
    dense, moe = build_model(dense_cfg, seed=5), build_model(moe_cfg, seed=6)
    with torch.no_grad():
        moe_params = dict(moe.named_parameters())
        for name, p in dense.named_parameters():
            target = name.replace("mlp.fc.", "mlp.experts.fc.").replace("mlp.proj.", "mlp.experts.proj.")
            moe_params[target].copy_(p.unsqueeze(0) if target != name else p)
    x = _tokens()
    loss_d, loss_m = dense(x[:, :-1], x[:, 1:]), moe(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(loss_m, loss_d, rtol=0, atol=1e-6)
    loss_d.backward()
    loss_m.backward()
    moe_params = dict(moe.named_parameters())
    for name, p in dense.named_parameters():
        target = name.replace("mlp.fc.", "mlp.experts.fc.").replace("mlp.proj.", "mlp.experts.proj.")
        got = moe_params[target].grad
        torch.testing.assert_close(got[0] if target != name else got, p.grad, rtol=0, atol=1e-6, msg=name)


def test_auxiliary_losses_reach_the_router_as_terms_of_the_loss() -> None:
    """The gradient the injection gives equals the gradient of LM loss + coefficients x auxiliary
    losses computed here from the router's own logits, at the accumulation scale."""
    cfg = _cfg(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01, moe_layer_freq=[0, 1])
    x = _tokens()
    injected = build_model(cfg, seed=3)
    injected.moe.aux_grad_scale = 0.5  # as with two micro-batches of gradient accumulation
    (0.5 * injected(x[:, :-1], x[:, 1:])).backward()

    explicit = build_model(cfg, seed=3)
    seen = _record_router_logits(explicit.layers[1].mlp)
    lm = explicit(x[:, :-1], x[:, 1:])
    logits = seen[0]
    scores, chosen, _ = route(logits, topk=2, score="softmax")
    aux = 0.1 * load_balancing_loss(scores, chosen, num_experts=4) + 0.01 * z_loss(logits)
    explicit.moe.aux_grad_scale = 0.0  # the injected term off: added explicitly instead
    lm_only = explicit(x[:, :-1], x[:, 1:])
    (0.5 * (lm_only + aux)).backward()
    torch.testing.assert_close(lm, lm_only)  # the reported loss is the LM loss alone
    for (name, a), (_, b) in zip(injected.named_parameters(), explicit.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert injected.layers[1].mlp.router.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_gradients_and_counts_once() -> None:
    x = _tokens()
    plain, ckpt = build_model(_cfg(), seed=4), build_model(_cfg(activation_checkpointing=True), seed=4)
    for m in (plain, ckpt):
        m(x[:, :-1], x[:, 1:]).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6, msg=name)
    for (_, a), (_, b) in zip(moe_layers(plain), moe_layers(ckpt)):
        assert a.stats.micro_batches == b.stats.micro_batches == 1
        assert torch.equal(a.stats.tokens, b.stats.tokens)


def test_metrics_count_the_load_and_reset() -> None:
    cfg = _cfg(moe_layer_freq=[1, 0], moe_expert_capacity_factor=1.0)
    model = build_model(cfg, seed=8)
    assert [n for n, _ in moe_layers(model)] == [0]
    seen = _record_router_logits(model.layers[0].mlp)
    x = _tokens(b=4)
    model(x[:, :-1], x[:, 1:])
    scores, chosen, weights = route(seen[0], topk=2, score="softmax")
    hits = torch.bincount(chosen.flatten(), minlength=4).float()
    capacity = math.ceil(1.0 * 64 * 2 / 4)
    dropped = sum(max(0, int(h) - capacity) for h in hits)
    got = moe_metrics(model, ParallelContext.single())
    assert got["moe/layer0/load_imbalance"] == pytest.approx(float(hits.max() / hits.mean()))
    assert got["moe_dropped_fraction"] == pytest.approx(dropped / 128)
    assert got["moe/layer0/load_balancing_loss"] == pytest.approx(
        load_balancing_loss(scores, chosen, num_experts=4).item(), rel=1e-5
    )
    assert "moe_expert_bias_range" not in got and "moe/layer1/z_loss" not in got
    assert moe_metrics(model, ParallelContext.single())["moe_load_imbalance"] == 0.0  # reset: nothing since


def test_expert_bias_moves_towards_an_even_load() -> None:
    cfg = _cfg(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01, moe_layer_freq=[1, 0])
    model = build_model(cfg, seed=9)
    layer = model.layers[0].mlp
    x = _tokens()
    model(x[:, :-1], x[:, 1:])
    load = layer.step_tokens.float()
    update_expert_bias(model, ParallelContext.single())
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert layer.step_tokens is None  # counted afresh every step
    assert "layers.0.mlp.router.expert_bias" in model.state_dict()  # saved with the model
    assert moe_metrics(model, ParallelContext.single())["moe_expert_bias_range"] == pytest.approx(
        float(expected.max() - expected.min())
    )


# ---- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["parallel.expert_model_parallel_size=2"], "needs a mixture of experts: set model.num_experts"),
        (["model.num_experts=4", "model.moe_router_topk=5"], r"moe_router_topk \(5\) exceeds model.num_experts \(4\)"),
        (["model.num_experts=6", "parallel.expert_model_parallel_size=4"],
         r"num_experts \(6\) must be divisible by parallel.expert_model_parallel_size \(4\)"),
        (["model.num_experts=4", "model.moe_layer_freq=0"], "moe_layer_freq = 0 must be at least 1"),
        (["model.num_experts=4", "model.moe_layer_freq=[1, 0]"], r"one 0 \(dense\) or 1 \(MoE\) per block"),
        (["model.num_experts=4", "model.moe_expert_capacity_factor=0"], "moe_expert_capacity_factor = 0.0 must be positive"),
        (["model.num_experts=4", "model.moe_router_score_function=relu"], "choose one of softmax, sigmoid"),
        (["model.num_experts=4", "parallel.tensor_model_parallel_size=2", "model.parallel_block=true"],
         "with model.parallel_block and parallel.tensor_model_parallel_size > 1 is not supported yet"),
        (["model.num_experts=4", "parallel.tensor_model_parallel_size=4", "model.seq_length=18", "model.num_attention_heads=4",
          "model.hidden_size=64"], r"seq_length \(18\) must be divisible by parallel.tensor_model_parallel_size \(4\)"),
        (["model.num_experts=4", "train.optimizer=muon"], "with train.optimizer: muon"),
    ],
)  # fmt: skip
def test_moe_mistakes_name_the_setting(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.num_layers=4", *overrides])


def test_moe_layouts_the_engine_cannot_run_are_refused() -> None:
    from llm.engine.deepspeed_config import deepspeed_setup

    cfg = load_config(None, ["model.num_experts=4", "parallel.expert_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size \(4\) must divide the data-parallel size \(2\)"):
        validate_world(cfg, 2)
    with pytest.raises(ConfigError, match="ZeRO stage 3 with a mixture of experts.*zero1.json"):
        deepspeed_setup(load_config(None, ["model.num_experts=4", "deepspeed_config=configs/deepspeed/zero3.json"]),
                        1, cuda=False)  # fmt: skip
    with pytest.raises(ConfigError, match="in bf16 needs ZeRO stage 1 or 2"):
        deepspeed_setup(load_config(None, ["model.num_experts=4"]), 1, cuda=True)
    _, plan = deepspeed_setup(load_config(None, ["model.num_experts=4", "parallel.expert_model_parallel_size=2"]),
                              2, cuda=False)  # fmt: skip
    assert plan.optimizer_from == "llm"  # ZeRO 0 with experts apart: llm's optimizer clips at the exact norm
    assert load_config(None, ["model.num_layers=4", "model.num_experts=4", "model.moe_layer_freq=2"]).model.moe_layers == [0, 2]
    assert load_config(None, ["model.num_layers=3", "model.num_experts=4",
                              "model.moe_layer_freq=[0, 1, 1]"]).model.moe_layers == [1, 2]  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_parameter_and_flop_counts_know_the_experts(arch: str) -> None:
    """Total parameters count every expert, active ones (FLOPs, MFU) the top-k; per EP rank its share."""
    from llm.model.flops import active_params, block_params, model_flops_per_token, total_params
    from llm.model.gpt import count_parameters

    cfg = _cfg(arch, num_layers=3, moe_layer_freq=[0, 1, 1], moe_shared_expert_intermediate_size=40)
    model = build_model(cfg, seed=0)
    assert total_params(cfg, VOCAB) == count_parameters(model)
    experts = model.layers[1].mlp.experts
    per_expert = sum(p[0].numel() for p in experts.parameters())  # one expert's fc, proj and biases
    assert active_params(cfg, VOCAB) == count_parameters(model) - 2 * (4 - 2) * per_expert
    assert block_params(cfg, 1, layer=1) - block_params(cfg, 1, layer=1, ep=2) == 2 * per_expert
    dense = _cfg(arch, num_layers=3, num_experts=None)
    assert model_flops_per_token(cfg) - model_flops_per_token(dense) == 6.0 * (
        active_params(cfg, VOCAB) - total_params(dense, VOCAB)
    )


@pytest.mark.parametrize(
    "kw, cls",
    [({}, "MixtralForCausalLM"),
     ({"moe_shared_expert_intermediate_size": 40, "moe_layer_freq": [0, 1], "tie_embeddings": True}, "Qwen2MoeForCausalLM")],
)  # fmt: skip
def test_hugging_face_export_and_import_of_a_mixture_of_experts(kw: dict, cls: str) -> None:
    """Logits of transformers' Mixtral / Qwen2-MoE on our weights equal ours (fp32), and the weights
    come back exactly (the import's config too)."""
    import transformers

    from llm.export.from_hf import model_config_from_hf
    from llm.model.hf import from_hf_state_dict, hf_config, to_hf_state_dict

    cfg = _cfg(num_query_groups=2, num_layers=2, moe_router_topk=2, **kw)
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():  # routers that choose distinctly (the initial ones score nearly evenly)
        for _, layer in moe_layers(model):
            layer.router.weight.mul_(50)
    config = hf_config(cfg)
    hf = getattr(transformers, cls)(config).eval()
    assert type(hf).__name__ == cls
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    x = _tokens(b=2, s=16)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    back_cfg = model_config_from_hf(config, seq_length=cfg.seq_length)
    assert (back_cfg.num_experts, back_cfg.moe_router_topk, back_cfg.moe_ffn_size, back_cfg.moe_layers,
            back_cfg.moe_shared_expert_intermediate_size) == (4, 2, 24, cfg.moe_layers,
                                                             cfg.moe_shared_expert_intermediate_size)  # fmt: skip
    back = from_hf_state_dict(hf.state_dict(), back_cfg)
    for name, value in model.state_dict().items():
        rows = VOCAB if name in ("embed.weight", "lm_head.weight") else value.shape[0]
        if "rotary" not in name:
            torch.testing.assert_close(back[name][:rows], value[:rows], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "kw, message",
    [({"architecture": "gpt2"}, "the gpt2 preset's experts"),
     ({"moe_router_score_function": "sigmoid"}, "sigmoid routing"),
     ({"moe_router_enable_expert_bias": True}, "the expert bias"),
     ({"moe_layer_freq": [0, 1]}, "dense blocks .* without shared experts")],
)  # fmt: skip
def test_a_mixture_of_experts_without_a_transformers_class_is_refused(kw: dict, message: str) -> None:
    from llm.model.hf import NoHFClassError, check_exportable

    with pytest.raises(NoHFClassError, match=f"cannot be exported: {message}.*scripts/evaluate.py"):
        check_exportable(_cfg(**kw))
