"""The accelerate-based E2E-QP trainer on a tiny packed Llama: numerics equal to a plain torch loop,
accumulation == big batch (token-weighted, also for masked instruction data), two runs with
different accelerate settings in one process, gradient checkpointing, zero-point training, resume."""
import math

import pytest
import torch
from e2e_helpers import tiny_packed_llama

from effqat_plugin.e2e_data import TokenDataset
from effqat_plugin.e2e_qp import E2EOptions, E2EQP, E2ESettings, quantized_modules, warmup_cosine
from effqat_plugin.evaluation import causal_lm_loss
from effqat_plugin.runtime import resolve_runtime


RT = resolve_runtime("cpu")




def token_data(n=12, t=16, seed=1):
    return torch.randint(0, 64, (n, t), generator=torch.Generator().manual_seed(seed))


def scales_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".scales")}


def assert_same_scales(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def run(model, ids, val=None, bs=4, epochs=2, lr=5e-3, warmup=0.2, **opts):
    st = E2ESettings(bits=2, e2e_epochs=epochs, e2e_max_auto_epochs=1, e2e_batch_size=bs, e2e_lr=lr,
                     e2e_warmup_ratio=warmup)
    return E2EQP(model, st, RT, show_progress=False, options=E2EOptions(**opts)).run(ids, val)


def reference_loop(model, ids, bs, epochs, lr, warmup_ratio, max_norm=0.3, seed=0):
    """The straightforward single-process E2E-QP loop (the pre-accelerate implementation), visiting
    the samples of epoch e in randperm order seeded by seed + e (the reference shuffles too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [m.scales for m in quantized_modules(model)]
    for p in params:
        p.requires_grad_(True)
    steps = epochs * math.ceil(ids.shape[0] / bs)
    warmup = int(round(warmup_ratio * steps))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, ids.shape[0], bs):
            for g in opt.param_groups:
                g["lr"] = lr * warmup_cosine(step, steps, warmup)
            batch = ids[order[i:i + bs]]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            with torch.no_grad():
                for m in quantized_modules(model):
                    m.scales.clamp_(1e-4, 1e4)
            step += 1
    return steps


def test_single_process_matches_plain_torch_loop():
    ids = token_data(12)
    val = ids[:4]   # held out from nothing: its loss falls, so the trained step sizes are kept (next test)
    ref = tiny_packed_llama()
    before = causal_lm_loss(ref, val, 4, RT)
    steps = reference_loop(ref, ids, bs=4, epochs=2, lr=5e-3, warmup_ratio=0.2)
    after = causal_lm_loss(ref, val, 4, RT)
    model = tiny_packed_llama()
    rep = run(model, ids, val, bs=4, epochs=2, lr=5e-3, warmup=0.2)
    assert rep.steps == rep.total_steps == steps == 6 and rep.completed
    assert after < before and rep.best_epoch == rep.epochs_run == 2
    assert rep.world_size == 1 and rep.grad_accum_steps == 1 and rep.mixed_precision == "no"
    assert_same_scales(scales_of(model), scales_of(ref))
    assert rep.val_loss_before == pytest.approx(before, abs=1e-5)
    assert rep.val_loss_after == pytest.approx(after, abs=1e-5)
    assert rep.trainable_values == sum(m.scales.numel() for m in quantized_modules(model))
    assert not any(p.requires_grad for p in model.parameters())  # frozen again afterwards
    # the step sizes really moved
    init = scales_of(tiny_packed_llama())
    assert all(not torch.equal(init[k], v) for k, v in scales_of(model).items())


def test_samples_are_shuffled_with_the_runs_seed():
    """Epoch e visits randperm(N) seeded by seed + e: another seed gives another order (other step
    sizes), each equal to the plain loop walking that order."""
    ids = token_data(12)
    runs = {}
    for seed in (0, 1):
        model = tiny_packed_llama()
        st = E2ESettings(bits=2, e2e_epochs=2, e2e_max_auto_epochs=1, e2e_batch_size=4, e2e_lr=5e-3,
                         e2e_warmup_ratio=0.2, seed=seed)
        E2EQP(model, st, RT, show_progress=False).run(ids)
        ref = tiny_packed_llama()
        reference_loop(ref, ids, bs=4, epochs=2, lr=5e-3, warmup_ratio=0.2, seed=seed)
        assert_same_scales(scales_of(model), scales_of(ref))
        runs[seed] = scales_of(model)
    assert max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0]) > 1e-5


def test_accumulation_micro1_x4_equals_batch4():
    ids = token_data(12)
    a, b = tiny_packed_llama(), tiny_packed_llama()
    ra = run(a, ids, bs=4)
    rb = run(b, ids, bs=4, micro_batch_size=1)
    assert rb.grad_accum_steps == 4 and rb.micro_batch_size == 1 and rb.steps == ra.steps == 6
    assert_same_scales(scales_of(a), scales_of(b))
    assert rb.train_loss == pytest.approx(ra.train_loss, abs=1e-5)


def instruction_like(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        src, tgt = 3 + i % 4, 2 + (i * 3) % 5  # different lengths and target counts per example
        row = torch.randint(3, 64, (src + tgt,), generator=g)
        ids.append(row)
        labels.append(torch.cat([torch.full((src,), -100), row[src:]]))
    return TokenDataset(ids, labels)


def test_accumulation_is_token_weighted_for_masked_padded_data():
    ds = instruction_like()
    a, b = tiny_packed_llama(), tiny_packed_llama()
    ra = run(a, ds, bs=4, epochs=1)
    rb = run(b, ds, bs=4, epochs=1, micro_batch_size=1)
    assert ra.steps == rb.steps == 2
    assert_same_scales(scales_of(a), scales_of(b), rtol=1e-4, atol=1e-6)
    assert ra.train_tokens == rb.train_tokens == ds.num_target_tokens()


def test_two_runs_with_different_accelerate_settings_in_one_process():
    from accelerate.state import AcceleratorState

    ids = token_data(8)
    m1 = tiny_packed_llama()
    r1 = run(m1, ids, bs=4, epochs=1, mixed_precision="bf16")  # CPU bf16 autocast
    assert r1.mixed_precision == "bf16" and AcceleratorState().mixed_precision == "bf16"
    m2 = tiny_packed_llama()
    r2 = run(m2, ids, bs=4, epochs=1, micro_batch_size=2)
    assert AcceleratorState().mixed_precision == "no" and r2.grad_accum_steps == 2
    ref = tiny_packed_llama()
    reference_loop(ref, ids, bs=4, epochs=1, lr=5e-3, warmup_ratio=0.2)
    assert_same_scales(scales_of(m2), scales_of(ref))
    # bf16 compute trains too, but not bit-identically
    assert all(math.isfinite(v) for v in (r1.train_loss, r2.train_loss))


def test_gradient_checkpointing_gives_same_scales_and_is_switched_off_after():
    ids = token_data(8)
    a, b = tiny_packed_llama(), tiny_packed_llama()
    run(a, ids, bs=4, epochs=1)
    run(b, ids, bs=4, epochs=1, gradient_checkpointing=True)
    assert_same_scales(scales_of(a), scales_of(b))
    assert not any(getattr(m, "gradient_checkpointing", False) for m in b.modules())


def test_train_zeros_trains_float_zero_points():
    ids = token_data(8)
    model = tiny_packed_llama(train_zeros=True)
    z0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".zeros")}
    st = E2ESettings(e2e_epochs=1, e2e_max_auto_epochs=1, e2e_batch_size=4, e2e_lr=5e-2, e2e_train_zeros=True)
    rep = E2EQP(model, st, RT, show_progress=False).run(ids)
    assert rep.trainable_values == sum(m.scales.numel() * 2 for m in quantized_modules(model))
    assert any(not torch.equal(z0[n], p) for n, p in model.named_parameters() if n.endswith(".zeros"))
    with pytest.raises(ValueError, match="train_zeros"):
        E2EQP(tiny_packed_llama(), st, RT, show_progress=False).run(ids)


def test_held_out_loss_that_rises_keeps_the_starting_step_sizes(tmp_path):
    """No epoch lowers the held-out loss (random tokens, a rate far too high): E2E-QP hands back the
    step sizes it was given (best_epoch 0), as an uninterrupted and a resumed run alike."""
    ids, val = token_data(12), token_data(4, seed=2)
    start = scales_of(tiny_packed_llama())
    model = tiny_packed_llama()
    rep = run(model, ids, val, bs=4, epochs=2, lr=0.5)
    assert rep.completed and rep.epochs_run == 2 and rep.best_epoch == 0
    assert rep.val_loss_after == rep.val_loss_before
    assert_same_scales(scales_of(model), start, rtol=0, atol=0)
    state = str(tmp_path / "state")
    run(tiny_packed_llama(), ids, val, bs=4, epochs=2, lr=0.5, state_dir=state, stop_after=2)
    resumed = tiny_packed_llama()   # handed the starting model, as the pipeline does, then the state
    rr = run(resumed, ids, val, bs=4, epochs=2, lr=0.5, state_dir=state, resume=True)
    assert rr.completed and rr.resumed_from_step == 2 and rr.best_epoch == 0
    assert_same_scales(scales_of(resumed), start, rtol=0, atol=0)
    trained = tiny_packed_llama()   # the same run without a held-out set trains and keeps its last epoch
    run(trained, ids, None, bs=4, epochs=2, lr=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(scales_of(trained).values(), start.values()))


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    ids = token_data(12)
    val = ids[:4]
    full = tiny_packed_llama()
    rf = run(full, ids, val, bs=4, micro_batch_size=2)
    state = str(tmp_path / "state")
    part = tiny_packed_llama()
    rp = run(part, ids, val, bs=4, micro_batch_size=2, state_dir=state, stop_after=2)
    assert not rp.completed and rp.steps == 2 and rp.val_loss_after is None
    resumed = tiny_packed_llama()  # fresh model: everything that matters comes from the state
    rr = run(resumed, ids, val, bs=4, micro_batch_size=2, state_dir=state, resume=True, save_every=1)
    assert rr.completed and rr.resumed_from_step == 2 and rr.steps == 6
    assert_same_scales(scales_of(resumed), scales_of(full), rtol=0, atol=0)
    assert rr.val_loss_before == rf.val_loss_before and rr.train_loss == pytest.approx(rf.train_loss, abs=1e-6)
    # a state from other settings is refused instead of silently mixed
    with pytest.raises(ValueError, match="other settings"):
        run(tiny_packed_llama(), ids, val, bs=4, micro_batch_size=2, lr=1e-3, state_dir=state, resume=True)


def test_settings_learning_rate_rule_matches_eqatconfig():
    from effqat_plugin import EQATConfig

    for bits in (2, 3, 4):
        for steps in (1, 7, 5000, 10**6, 10**9):
            for preset in ("auto", "paper"):
                a = EQATConfig(bits=bits, lr_preset=preset).e2e_learning_rate(steps)
                b = E2ESettings(bits=bits, lr_preset=preset).e2e_learning_rate(steps)
                assert a == pytest.approx(b), (bits, steps, preset)


def test_bad_batch_geometry_is_refused():
    with pytest.raises(ValueError, match="multiple"):
        run(tiny_packed_llama(), token_data(8), bs=4, micro_batch_size=3)


def test_fsdp_where_accelerate_cannot_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="FSDP"):
        run(tiny_packed_llama(), token_data(8), bs=4, fsdp=True)


def test_auto_preset_repeats_short_runs_and_keeps_the_best_epoch(monkeypatch):
    """Below the paper's 128 optimizer steps the auto preset repeats the data (at most
    e2e_max_auto_epochs), evaluates each epoch and keeps the step sizes of the best one; the paper
    preset and an explicit count train exactly e2e_epochs."""
    from effqat_plugin import lr_rules

    assert lr_rules.e2e_epochs(1, 30, "auto", 3) == 3 and lr_rules.e2e_epochs(1, 64, "auto", 3) == 2
    assert lr_rules.e2e_epochs(1, 128, "auto", 3) == 1 and lr_rules.e2e_epochs(1, 30, "paper", 3) == 1
    assert lr_rules.e2e_epochs(4, 30, "auto", 3) == 4 and lr_rules.e2e_epochs(0, 30, "auto", 3) == 0
    ids, val = token_data(12), token_data(4, seed=2)
    seen = []
    real = E2EQP.evaluate

    def evaluate(self, model, data, bs):   # each epoch-end evaluation returns a made-up loss, the
        v = real(self, model, data, bs)     # second epoch's the lowest, and remembers the scales
        seen.append((v, scales_of(model)))
        return [v, 3.0, 1.0, 2.0][len(seen) - 1] if len(seen) <= 4 else v
    monkeypatch.setattr(E2EQP, "evaluate", evaluate)
    model = tiny_packed_llama()
    st = E2ESettings(bits=2, e2e_epochs=1, e2e_max_auto_epochs=3, e2e_batch_size=4, e2e_lr=5e-3)
    rep = E2EQP(model, st, RT, show_progress=False).run(ids, val)
    assert rep.epochs == 3 and rep.steps == rep.total_steps == 9 and rep.best_epoch == 2
    assert [h["epoch"] for h in rep.eval_history] == [1, 2, 3] and rep.val_loss_after == 1.0
    assert_same_scales(scales_of(model), seen[2][1], rtol=0, atol=0)   # epoch 2's scales, not the last
    assert not torch.equal(seen[2][1][next(iter(seen[2][1]))], seen[3][1][next(iter(seen[3][1]))])


def _scripted_evaluate(monkeypatch, losses):
    """E2EQP.evaluate returns ``losses`` in order (before training, then each epoch's end) and keeps
    a copy of the scales it was called on."""
    seen = []

    def evaluate(self, model, data, bs):
        seen.append(scales_of(model))
        return losses[len(seen) - 1]
    monkeypatch.setattr(E2EQP, "evaluate", evaluate)
    return seen


def _auto_run(max_epochs=4):
    model = tiny_packed_llama()
    st = E2ESettings(bits=2, e2e_epochs=1, e2e_max_auto_epochs=max_epochs, e2e_batch_size=4, e2e_lr=5e-3)
    return model, E2EQP(model, st, RT, show_progress=False).run(token_data(12), token_data(4, seed=2))


def test_auto_epochs_continue_while_held_out_loss_falls_by_more_than_the_threshold(monkeypatch):
    from effqat_plugin import lr_rules

    assert lr_rules.e2e_continue(4.0, 3.95) and not lr_rules.e2e_continue(4.0, 3.97)  # 1.25% / 0.75%
    _scripted_evaluate(monkeypatch, [5.0, 4.0, 3.5, 3.2, 3.0])   # every epoch gains > 1%
    _, rep = _auto_run()
    assert (rep.epochs, rep.epochs_run, rep.best_epoch) == (4, 4, 4)
    assert rep.steps == rep.total_steps == 12 and rep.completed and rep.val_loss_after == 3.0


def test_auto_epochs_stop_once_an_epoch_gains_less_than_the_threshold(monkeypatch):
    # epoch 2 gains 0.25% over epoch 1: stop there (2 of 4 planned), keep the better of the two
    _scripted_evaluate(monkeypatch, [5.0, 4.0, 3.99, 1.0, 1.0])
    _, rep = _auto_run()
    assert (rep.epochs, rep.epochs_run, rep.best_epoch) == (4, 2, 2)
    assert rep.steps == 6 and rep.total_steps == 12 and rep.completed and rep.val_loss_after == 3.99
    assert [h["epoch"] for h in rep.eval_history] == [1, 2]


def test_auto_epochs_stop_when_held_out_loss_rises_and_keep_the_best_epoch(monkeypatch):
    seen = _scripted_evaluate(monkeypatch, [5.0, 4.0, 4.5, 1.0, 1.0])
    model, rep = _auto_run()
    assert (rep.epochs_run, rep.best_epoch, rep.val_loss_after) == (2, 1, 4.0)
    assert_same_scales(scales_of(model), seen[1], rtol=0, atol=0)   # epoch 1's scales, not epoch 2's
