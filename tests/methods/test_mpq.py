"""MPQ: the fixed grid and the extra level against torch ops, flip counting and the extra-bit choice on hand
cases, the near-threshold gradient factor, state round trip, bit-exact integer export, bits stored, config."""

import pytest
import torch
from torch import nn

from hwquant.errors import ConfigError
from hwquant.export import compare, integer_model
from hwquant.hw import layer_costs
from hwquant.methods import MixedWeightQuantizer, MPQConfig, build_qat_model, mpq_summary, prepare_qat, schedule_mpq
from hwquant.models import create_model
from hwquant.nn import quant_layers
from hwquant.spec import QuantParams, QuantSpec

SPEC = QuantSpec(bits=3, signed=True, granularity="channel", observer="mse", range_mode="static")


def _quantizer(scale, n, **kw):
    """A calibrated 3-bit quantizer with base step ``scale`` (per channel) for a (C, n) weight."""
    q = MixedWeightQuantizer(SPEC, axis=0, **kw)
    s = torch.tensor(scale, dtype=torch.float32)
    q.set_params(QuantParams(s, torch.zeros_like(s, dtype=torch.int32), 3, True, 0))
    q._ensure(torch.zeros(len(scale), n))
    return q


def _batches(n=3, shape=(16, 1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)) for _ in range(n)]


def test_grid_and_extra_level_match_torch_ops():
    q = _quantizer([0.5, 0.25], 64)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 64, generator=g)
    s = torch.tensor([[0.5], [0.25]])
    assert torch.equal(q.scale, torch.tensor([0.25, 0.125]))  # stored: the fine step s / 2
    q.eval()
    coarse = torch.clamp(torch.round(w / s), -4, 3) * s
    assert torch.equal(q(w), coarse)
    q.extra[:, ::3] = True
    fine = torch.clamp(torch.round(2 * w / s), -8, 6) * (s / 2)  # one more level between each pair, same range
    assert torch.equal(q(w), torch.where(q.extra, fine, coarse))
    c = q.codes(w)
    assert int(c.min()) >= -8 and int(c.max()) <= 6 and q.code_bits == 4
    assert bool((c[~q.extra] % 2 == 0).all())  # coarse weights are the even codes of the fine grid
    assert torch.equal(q.weight_widths(), 3 + q.extra.long())


def test_flip_counting_and_extra_choice_by_hand():
    q = _quantizer([1.0], 4, min_flips=2, max_extra=0.5, gamma=1.0)
    q.flag_step.fill_(5)
    q.train()
    # coarse codes per step:   w0: 0 1 0 1 0 (3 reversals)   w1: 0 1 2 3 3 (none)
    #                          w2: 0 0 1 1 0 (1 reversal)    w3: 0 1 0 1 0, also 3, but over budget (2 of 4)
    seq = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 1], [0, 2, 1, 0], [1, 3, 1, 1], [0, 3, 0, 0]], dtype=torch.float32)
    for row in seq:
        with torch.enable_grad():
            q(row.reshape(1, 4).clone().requires_grad_())
    assert q.flips.tolist() == [[3, 0, 1, 3]]
    assert q.extra.tolist() == [[True, False, False, True]]  # both have 3 >= 2 flips; budget floor(0.5 * 4) = 2
    q2 = _quantizer([1.0], 4, min_flips=2, max_extra=0.25, gamma=1.0)
    q2.flag_step.fill_(5)
    q2.train()
    for row in seq:
        q2(row.reshape(1, 4).clone().requires_grad_())
    assert q2.extra.tolist() == [[True, False, False, False]]  # budget 1: the tie goes to the lower index
    n_before = q2.flips.clone()
    q2(torch.full((1, 4), 2.0, requires_grad=True))  # after the flag step nothing is counted any more
    assert torch.equal(q2.flips, n_before) and int(q2.step) == 5


def test_flips_only_counted_inside_the_window():
    q = _quantizer([1.0], 1, gamma=1.0)
    q.flag_step.fill_(6)
    q.count_from.fill_(3)  # steps 1..3 are not compared; 4 sets the reference; 5, 6 are compared
    q.train()
    for v in [0, 1, 0, 1, 0, 1]:  # would be 4 reversals from the start
        q(torch.tensor([[float(v)]], requires_grad=True))
    # step 4 sets the reference (code 1); step 5: 1 -> 0, the first change; step 6: 0 -> 1, a reversal
    assert q.flips.tolist() == [[1]]


def test_lower_gradient_near_a_rounding_threshold():
    q = _quantizer([1.0], 6, eps=0.1, gamma=0.1, lr_scope="all")  # the distance rule on every weight
    q.extra[0, 5] = True  # an extra weight: its thresholds are at (k + 1/2) / 2
    q.flag_step.fill_(0)  # scheduled, the extra bits already assigned
    q.train()
    w = torch.tensor([[0.45, 0.3, 1.55, 0.7, 10.0, 0.26]], requires_grad=True)
    q(w).sum().backward()
    # 0.45, 1.55 within 0.1 of a threshold (x.5); 0.3, 0.7 not; 10 is clipped (STE gradient 0);
    # the extra 0.26 -> 0.52 on its grid: near 0.5
    assert w.grad[0].tolist() == pytest.approx([0.1, 1.0, 0.1, 1.0, 0.0, 0.1])


def test_state_dict_round_trip_and_summary():
    cfg = MPQConfig(w_bits=3, a_bits=4)
    qm = prepare_qat(create_model("small_cnn", in_channels=1, num_classes=4), cfg, _batches())
    mixed = [(n, layer.weight_quant) for n, layer in quant_layers(qm) if isinstance(layer.weight_quant,
                                                                                   MixedWeightQuantizer)]
    assert mixed and all(n not in ("conv1", "fc") for n, _ in mixed)  # first / last stay at 8 bits
    name, wq = mixed[0]
    wq.extra.view(-1)[:5] = True
    wq.flips.view(-1)[:7] = 2
    qm.eval()
    x = _batches(1, seed=3)[0][0]
    with torch.no_grad():
        ref = qm(x)
    back = build_qat_model(create_model("small_cnn", in_channels=1, num_classes=4), cfg)
    back.load_state_dict(qm.state_dict())
    back.eval()
    with torch.no_grad():
        assert torch.equal(back(x), ref)
    row = next(r for r in mpq_summary(back) if r["layer"] == name)
    assert row["extra"] == 5 and row["flips"] == 14 and row["w_bits_mean"] == pytest.approx(3 + 5 / row["weights"])


def test_integer_export_is_bit_exact_with_extra_weights():
    cfg = MPQConfig(w_bits=3, a_bits=4, pow2=True)
    torch.manual_seed(0)
    qm = prepare_qat(create_model("resnet20", in_channels=1, num_classes=4, width=0.5), cfg, _batches()).eval()
    g = torch.Generator().manual_seed(1)
    for _, layer in quant_layers(qm):
        if isinstance(layer.weight_quant, MixedWeightQuantizer):
            layer.weight_quant.extra.copy_(torch.rand(layer.weight.shape, generator=g) < 0.2)
    test = _batches(3, seed=7)
    im = integer_model(qm, test[0][0][:1])
    res = compare(qm, im, test)
    assert res["codes_diff"] == 0 and res["out_diff"] == 0
    assert max(r["w_bits"] for r in im.layers()[1:-1]) == 4  # the extra bit: 4-bit codes on the fine grid


def test_bits_stored_follow_the_extra_weights():
    qm = prepare_qat(create_model("small_cnn", in_channels=1, num_classes=4), MPQConfig(w_bits=3), _batches())
    x = torch.zeros(1, 1, 12, 12)
    base = {r["layer"]: r for r in layer_costs(qm, x)}
    name, layer = next((n, la) for n, la in quant_layers(qm) if isinstance(la.weight_quant, MixedWeightQuantizer))
    layer.weight_quant.extra.view(-1)[:3] = True
    mixed = {r["layer"]: r for r in layer_costs(qm, x)}[name]
    n = layer.weight.numel()
    assert base[name]["w_bits"] == 3 and mixed["w_hist"] == {3: n - 3, 4: 3}
    assert mixed["stored_bits"] == base[name]["stored_bits"] + 3 + mixed["index_bits"] and mixed["index_bits"] > 0


def _oscillating_fit(max_extra):
    """A linear fit whose optimum lies exactly on rounding thresholds of the 3-bit grid: the STE makes every
    weight oscillate across its threshold, the case MPQ's extra level is for."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(8, 1, bias=False))
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    cfg = MPQConfig(w_bits=3, a_bits=8, first_last_bits=None, min_flips=2, max_extra=max_extra, gamma=1.0)
    qm = prepare_qat(lin, cfg, [x[:256]])
    wq = qm[0].weight_quant
    w_star = (torch.tensor([-3.0, -2, -1, 0, 1, 2, -2, 1]) + 0.5) * float(2 * wq.scale)
    y = x @ w_star[:, None]
    assert schedule_mpq(qm, 200, cfg) == (50, 100)
    opt = torch.optim.SGD(qm.parameters(), lr=0.05)
    qm.train()
    for _ in range(200):
        opt.zero_grad()
        ((qm(x) - y) ** 2).mean().backward()
        opt.step()
    qm.eval()
    with torch.no_grad():
        return float(((qm(x) - y) ** 2).mean()), wq


def test_mpq_training_gives_oscillating_weights_the_extra_level():
    loss_mpq, wq = _oscillating_fit(0.5)
    loss_uniform, wq_u = _oscillating_fit(0.0)
    flips = wq.flips[0]
    assert bool((flips > 20).all())  # 50 counted steps: nearly every step reverses
    assert torch.equal(wq_u.flips, wq.flips) and not bool(wq_u.extra.any())  # same run up to the flag step
    extra = wq.extra[0]
    assert int(extra.sum()) == 4  # budget floor(0.5 * 8)
    assert int(flips[extra].min()) >= int(flips[~extra].max())  # the most flipping ones
    assert loss_mpq < 0.7 * loss_uniform  # the extra level sits on the optimum


@pytest.mark.parametrize("kw,needle", [
    ({"flag_at": 1.0}, "flag_at"), ({"window": 0.6}, "window"), ({"min_flips": 0}, "min_flips"),
    ({"max_extra": 1.5}, "max_extra"), ({"eps": 0.7}, "eps"), ({"gamma": 0.0}, "gamma"),
    ({"w_bits": 16}, "w_bits"),
])
def test_config_validation(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        MPQConfig(**kw)
    with pytest.raises(ConfigError, match="at least 2"):
        schedule_mpq(nn.Sequential(), 1, MPQConfig())


def test_training_without_a_schedule_fails_loudly():
    """Without schedule_mpq no weight would ever get the extra bit: MPQ would silently be uniform QAT."""
    q = _quantizer([1.0], 4)
    q.train()
    w = torch.randn(1, 4, requires_grad=True)
    with pytest.raises(ConfigError, match="schedule_mpq"):
        q(w)
    q.eval()
    q(w)  # evaluation needs no schedule


def test_wide_codes_do_not_wrap():
    """w_bits = 8: coarse codes reach +-127 and fine codes +-255; int8 would wrap them."""
    spec = QuantSpec(bits=8, signed=True, granularity="channel", narrow=True)
    q = MixedWeightQuantizer(spec, axis=0)
    s = torch.tensor([1.0])
    q.set_params(QuantParams(s, torch.zeros_like(s, dtype=torch.int32), 8, True, 0))
    w = torch.tensor([[127.0, -127.0, 3.0, 300.0]])
    q._ensure(w)
    q.extra[0, 2] = True
    assert q._coarse_codes(w).tolist() == [[127, -127, 3, 127]]
    codes = q.codes(w)
    assert codes.dtype == torch.int16 and codes.tolist() == [[254, -254, 6, 254]]


def test_flips_are_counted_per_optimizer_step_not_per_forward():
    """A parameter weight: forwards on unchanged weights (gradient accumulation) are one step; only an
    optimizer update makes a new one.  Codes 0 -> 1 -> 0 -> 1 over four steps: 2 reversals, however many
    forwards each step has."""
    def run(forwards_per_step):
        q = _quantizer([1.0], 1, gamma=1.0)
        q.flag_step.fill_(10)
        q.train()
        w = nn.Parameter(torch.zeros(1, 1))
        for v in (0.0, 1.0, 0.0, 1.0):
            with torch.no_grad():
                w.copy_(torch.tensor([[v]]))  # what an optimizer step does: an in-place update
            for _ in range(forwards_per_step):
                q(w).sum().backward()
        return q

    one, three = run(1), run(3)
    assert one.flips.tolist() == three.flips.tolist() == [[2]]
    assert int(one.step) == int(three.step) == 4 and int(three.counted_steps) == 3
    # a computed (non-parameter) weight: every forward is a step, as before
    q = _quantizer([1.0], 1, gamma=1.0)
    q.flag_step.fill_(10)
    q.train()
    for v in (0.0, 1.0, 0.0):
        q(torch.tensor([[v]], requires_grad=True))
    assert int(q.step) == 3 and q.flips.tolist() == [[1]]


def test_random_choice_matches_the_flip_count_and_is_seeded():
    """choose='random': per layer as many extra weights as the flip rule picks, at random, reproducibly."""
    def chosen(choose, seed):
        q = _quantizer([1.0], 64, min_flips=1, max_extra=0.5, gamma=1.0, choose=choose, seed=seed)
        q.flips.view(-1)[:10] = 3  # the flip rule takes exactly these ten
        q._flag()
        return q.extra.clone()

    flips = chosen("flips", 0)
    assert flips.view(-1)[:10].all() and int(flips.sum()) == 10
    r0, r0b, r1 = chosen("random", 0), chosen("random", 0), chosen("random", 1)
    assert int(r0.sum()) == int(r1.sum()) == 10
    assert torch.equal(r0, r0b) and not torch.equal(r0, r1) and not torch.equal(r0, flips)
    with pytest.raises(ConfigError, match="choose"):
        MPQConfig(choose="most")


def test_summary_reports_flip_histogram_frequency_and_slowed_share():
    q = _quantizer([1.0], 4, eps=0.1, gamma=0.5, lr_scope="all")
    q.flag_step.fill_(100)
    q.train()
    w = nn.Parameter(torch.tensor([[0.45, 0.3, 0.0, 0.0]]))  # w0 near a threshold every step, w1 never
    codes = [[0, 0, 0, 0], [1, 0, 0, 1], [0, 0, 0, 1], [1, 0, 0, 0]]  # w0: 2 reversals, w3: 1 (0 1 1 0)
    for c in codes:
        with torch.no_grad():
            w.copy_(torch.tensor([c], dtype=torch.float32) + torch.tensor([[0.45, 0.3, 0.0, 0.0]]))
        q(w).sum().backward()
    layer = nn.Module()  # mpq_summary reads quantized layers: wrap the quantizer in one
    from hwquant.nn import QuantLinear
    lin = QuantLinear(4, 1, bias=False)
    lin.weight_quant = q
    layer.lin = lin
    row = mpq_summary(layer)[0]
    assert row["flip_hist"][:3] == [2, 1, 1] and sum(row["flip_hist"]) == 4
    assert row["counted_steps"] == 3 and row["flipping_weights"] == 2
    assert row["flip_frequency_mean"] == pytest.approx((2 + 1) / 2 / 3)
    assert row["slowed_share_mean"] == pytest.approx(0.25)  # w0 (x.45) only; 0.3 and 0.0 are not near x.5


def test_lr_scope_after_flag_and_flipping_by_hand():
    """The lr factor's scope: ``after_flag`` slows near-threshold weights only once the extra bits are assigned,
    ``flipping`` only the near-threshold weights that have flipped in the window; ``all`` every one of them."""
    base = torch.tensor([[0.45, 0.3, 1.55, 0.45]])  # w0, w2, w3 near a threshold (x.5 +- 0.1); w1 not

    def grads(scope, steps):
        q = _quantizer([1.0], 4, eps=0.1, gamma=0.1, lr_scope=scope)
        q.flag_step.fill_(3)
        q.train()
        w = nn.Parameter(base.clone())
        out = []
        # codes w3: 0 -> 1 -> 0 (one reversal, counted at step 3); the others keep their code
        for k in range(steps):
            with torch.no_grad():
                w.copy_(base + torch.tensor([[0.0, 0.0, 0.0, [0.0, 1.0, 0.0, 0.0][k]]]))
            w.grad = None
            q(w).sum().backward()
            out.append(w.grad[0].tolist())
        return out, q

    g, q = grads("all", 4)
    assert g[0] == pytest.approx([0.1, 1.0, 0.1, 0.1]) and g[3] == pytest.approx([0.1, 1.0, 0.1, 0.1])
    g, q = grads("after_flag", 4)
    assert g[0] == g[1] == pytest.approx([1.0, 1.0, 1.0, 1.0])  # steps 1, 2: before the flag (step 3)
    assert g[2] == g[3] == pytest.approx([0.1, 1.0, 0.1, 0.1])
    g, q = grads("flipping", 4)
    assert q.flips.tolist() == [[0, 0, 0, 1]]
    assert g[1] == pytest.approx([1.0, 1.0, 1.0, 1.0])  # no flip yet
    assert g[2] == g[3] == pytest.approx([1.0, 1.0, 1.0, 0.1])  # w3 flipped at step 3 and sits near x.5
    with pytest.raises(ConfigError, match="lr_scope"):
        MPQConfig(lr_scope="near")
