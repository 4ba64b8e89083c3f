"""Loss definitions against float64/dense references, and the chunked analytic-gradient path against autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.cache.schema import ENSEMBLE
from kdcache.errors import KdcacheError
from kdcache.student.kd import KDForm, KDLoss, KDPlan, Targets, TeacherTargets, distillation_loss, kd_form
from kdcache.student.kd import form as form_module
from kdcache.student.kd.hidden import (
    HiddenAlignment, HiddenPair, HiddenProjections, hidden_alignment_loss, uniform_layer_mapping,
)
from kdcache.student.kd.renorm import renormalized_topk_kl
from kdcache.student.kd.sampled import sampled_kl
from kdcache.student.kd.tail import tail_bucket_kl
from kdcache.student.lm import next_token_ce
from kdcache.student.online import dense_kl

TEMPERATURES = [0.5, 1.0, 2.0, 4.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _teacher_logits(shape: tuple[int, ...], seed: int, scale: float = 3.0) -> torch.Tensor:
    """Dense teacher logits, rounded through float16 as the cache stores them."""
    return (torch.randn(shape, generator=_gen(seed)) * scale).half().float()


def _cache(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What precompute stores: top-k float16 logits (sorted), their ids, and the full-vocab lse at T (float32)."""
    values, ids = teacher.topk(k, dim=-1)
    lse = torch.logsumexp(teacher.double() / temperature, dim=-1).float()
    return values.half(), ids, lse


def _reference_tail_kl(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float):
    """float64 (k+1)-class KL from dense logits: the cached ids plus one bucket for everything else."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    p_ids, q_ids = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = p.scatter(-1, ids, 0).sum(-1), q.scatter(-1, ids, 0).sum(-1)
    kl = (p_ids * (p_ids.log() - q_ids.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return kl * temperature**2


def _dense_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = torch.log_softmax(teacher.double() / temperature, -1)
    log_q = torch.log_softmax(student.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tail_kl_equals_dense_kl_when_teacher_support_is_inside_topk(temperature):
    B, L, V, k = 2, 3, 40, 6
    support = torch.randperm(V, generator=_gen(0))[:k]
    teacher = torch.full((B, L, V), -1e4)
    teacher[..., support] = _teacher_logits((B, L, k), seed=1)
    student = torch.randn(B, L, V, generator=_gen(2)) * 2
    values, ids, lse = _cache(teacher, k, temperature)

    got = tail_bucket_kl(student, values, ids, lse, temperature)

    assert got.shape == (B, L)
    torch.testing.assert_close(got.double(), _dense_kl(student, teacher, temperature), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tail_kl_value_and_gradient_match_float64_reference(temperature):
    N, V, k = 12, 64, 8
    teacher = _teacher_logits((N, V), seed=3)
    student = torch.randn(N, V, generator=_gen(4)) * 2
    weights = torch.rand(N, generator=_gen(5))  # distinct per-position weights so every row's gradient is checked
    values, ids, lse = _cache(teacher, k, temperature)

    s32 = student.clone().requires_grad_()
    got = tail_bucket_kl(s32, values, ids, lse, temperature)
    (got * weights).sum().backward()
    s64 = student.double().requires_grad_()
    want = _reference_tail_kl(s64, teacher, ids, temperature)
    (want * weights.double()).sum().backward()

    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_tail_kl_stays_a_divergence_when_float16_rounding_overshoots_the_mass():
    V, k, temperature = 30, 30 - 1, 1.0
    teacher = _teacher_logits((5, V), seed=6)
    teacher[:, 0] = -30  # the single tail token carries ~no mass, so rounding decides whether sum p_ids > 1
    values, ids, lse = _cache(teacher, k, temperature)
    student = torch.randn(5, V, generator=_gen(7)).requires_grad_()

    got = tail_bucket_kl(student, values, ids, lse - 1e-3, temperature)  # lse too small: cached mass ≈ 1.001
    got.sum().backward()

    assert torch.isfinite(got).all() and (got >= 0).all()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_renormalized_topk_kl_matches_definition(temperature):
    N, V, k = 10, 50, 7
    teacher = _teacher_logits((N, V), seed=8)
    values, ids, _ = _cache(teacher, k, temperature)
    student = torch.randn(N, V, generator=_gen(9))

    s32 = student.clone().requires_grad_()
    got = renormalized_topk_kl(s32, values, ids, temperature)
    got.sum().backward()
    s64 = student.double().requires_grad_()
    p = torch.softmax(values.double() / temperature, -1)  # renormalised over the k ids
    log_q = torch.log_softmax(s64 / temperature, -1).gather(-1, ids)  # full-vocab student, not renormalised
    want = (p * (p.log() - log_q)).sum(-1) * temperature**2
    want.sum().backward()

    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def _draw_samples(p: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled targets as cached: unique ids + counts, padded with (id 0, count 0) to `draws` entries."""
    samples = torch.multinomial(p, draws, replacement=True, generator=_gen(seed))
    dense = F.one_hot(samples, p.shape[-1]).sum(-2)
    counts, ids = dense.sort(dim=-1, descending=True)
    counts, ids = counts[..., :draws], ids[..., :draws]
    return torch.where(counts > 0, ids, 0), counts.to(torch.int32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_kl_matches_definition_and_ignores_padding(temperature):
    N, V, draws = 8, 30, 12
    p = torch.softmax(_teacher_logits((N, V), seed=10) / temperature, -1)
    ids, counts = _draw_samples(p, draws, seed=11)
    assert (counts == 0).any()  # padding is exercised, and pad id 0 may repeat a real id
    student = torch.randn(N, V, generator=_gen(12))

    s32 = student.clone().requires_grad_()
    got = sampled_kl(s32, ids, counts, temperature)
    got.sum().backward()
    s64 = student.double().requires_grad_()
    log_q = torch.log_softmax(s64 / temperature, -1)
    want = torch.zeros(N, dtype=torch.float64)
    for i in range(N):  # naive: only the real (count > 0) entries
        real = counts[i] > 0
        p_hat = counts[i][real].double() / counts[i].sum()
        want[i] = (p_hat * (p_hat.log() - log_q[i, ids[i][real]])).sum()
    want = want * temperature**2
    want.sum().backward()

    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)


def test_sampled_targets_are_unbiased():
    V, temperature = 10, 2.0
    teacher = _teacher_logits((V,), seed=13, scale=1.5)
    p = torch.softmax(teacher / temperature, -1)

    # many draws: p̂ -> p
    ids, counts = _draw_samples(p.unsqueeze(0), 200_000, seed=14)
    p_hat = torch.zeros(V).index_add_(0, ids[0], counts[0].float()) / counts.sum()
    torch.testing.assert_close(p_hat, p, atol=5e-3, rtol=0)

    # few draws, many repetitions: the mean gradient is the dense KL's gradient T·(q - p)
    reps, draws = 4000, 4
    ids, counts = _draw_samples(p.expand(reps, V), draws, seed=15)
    student = torch.randn(V, generator=_gen(16)).requires_grad_()
    sampled_kl(student.expand(reps, V), ids, counts, temperature).mean().backward()
    dense_grad = temperature * (torch.softmax(student.detach() / temperature, -1) - p)
    torch.testing.assert_close(student.grad, dense_grad, atol=0.03, rtol=0)


def seed_exact_kd(student_logits, topk_logits, topk_ids, teacher_lse, temperature, chunk_positions):
    """The seed_exact form's KD term alone (hard_weight 0), as `kdcache distill` computes it from its plan."""
    B, L, _ = student_logits.shape
    plan = KDPlan(kd_form("seed_exact").groups({}, 0.0, L), "seed_exact", 0.0, temperature, {ENSEMBLE: 0})
    batch = {"input_ids": torch.zeros(B, L, dtype=torch.long), f"{ENSEMBLE}/topk_logits": topk_logits,
             f"{ENSEMBLE}/topk_ids": topk_ids, f"{ENSEMBLE}/lse": teacher_lse}
    total, _ = KDLoss(plan, chunk_positions)(student_logits, batch)
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_seed_exact_kd_equals_babyllama_dense_kl_divloss(temperature):
    B, L, V = 3, 5, 32
    ensemble = _teacher_logits((B, L, V), seed=17)
    values, ids, lse = _cache(ensemble, V, temperature)  # k == V
    student = torch.randn(B, L, V, generator=_gen(18))

    s_dense = student.clone().requires_grad_()
    want = temperature**2 * nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s_dense / temperature, -1), F.softmax(ensemble / temperature, -1)
    )
    want.backward()
    for chunk in (4, 4096):  # 4 does not divide B·L = 15
        s = student.clone().requires_grad_()
        got = seed_exact_kd(s, values, ids, lse, temperature, chunk_positions=chunk)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s.grad, s_dense.grad, rtol=1e-4, atol=1e-7)


def _batch(B: int, L: int, V: int, temperature: float):
    """Student logits, input ids and three teachers, one per target form."""
    input_ids = torch.randint(0, V, (B, L), generator=_gen(20))
    tail_v, tail_i, tail_lse = _cache(_teacher_logits((B, L, V), seed=21), 5, temperature)
    ren_v, ren_i, _ = _cache(_teacher_logits((B, L, V), seed=22), 4, temperature)
    p = torch.softmax(_teacher_logits((B * L, V), seed=23) / temperature, -1)
    smp_i, smp_c = (a.view(B, L, -1) for a in _draw_samples(p, 6, seed=24))
    teachers = [
        TeacherTargets("big", 0.7, kd_form("tail"), {"topk_logits": tail_v, "topk_ids": tail_i, "lse": tail_lse}),
        TeacherTargets("mid", 0.5, kd_form("renorm"), {"topk_logits": ren_v, "topk_ids": ren_i}),
        TeacherTargets("rs", 1.3, kd_form("sampled"), {"sample_ids": smp_i, "sample_counts": smp_c}),
    ]
    logits = torch.randn(B, L, V, generator=_gen(25)) * 2
    return logits, input_ids, teachers


def _unchunked(logits, input_ids, teachers, hard_weight, temperature):
    """The same total written with the autograd definitions (each form's `kl`)."""
    terms = {"hard_ce": next_token_ce(logits, input_ids)}
    for t in teachers:
        terms[f"kl/{t.name}"] = t.form.kl(logits, t.arrays, temperature).mean()
    total = hard_weight * terms["hard_ce"] + sum(t.weight * terms[f"kl/{t.name}"] for t in teachers)
    return total, terms


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(
    # bf16: the float32 gradient is stored rounded (2^-8 relative), then scaled by the upstream 2.5 (again 2^-8)
    "dtype, rtol, atol", [(torch.float32, 1e-5, 1e-7), (torch.bfloat16, 2**-7, 1e-9)], ids=["fp32", "bf16"]
)
def test_chunked_distillation_loss_matches_autograd(temperature, dtype, rtol, atol):
    B, L, V, hard_weight = 3, 7, 50, 0.4
    logits, input_ids, teachers = _batch(B, L, V, temperature)
    logits = logits.to(dtype)
    untouched = logits.clone()

    ref_leaf = logits.to(torch.float32, copy=True).requires_grad_()  # float32 reference on the same values
    want, want_terms = _unchunked(ref_leaf, input_ids, teachers, hard_weight, temperature)
    (2.5 * want).backward()  # a non-unit upstream gradient, as from a loss scaler
    for chunk in (1, 4, 5, B * L, 4096):  # 4 and 5 do not divide N = 21
        leaf = logits.clone().requires_grad_()
        got, terms = distillation_loss(leaf, input_ids, teachers, hard_weight, temperature, chunk_positions=chunk)
        (2.5 * got).backward()

        assert set(terms) == set(want_terms) and not any(v.requires_grad for v in terms.values())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name, value in terms.items():
            torch.testing.assert_close(value, want_terms[name], rtol=1e-5, atol=1e-6)
        assert leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.float(), ref_leaf.grad, rtol=rtol, atol=atol)
        assert torch.equal(leaf, untouched)  # the logits are read, never overwritten


def test_distillation_loss_without_grad_returns_values():
    logits, input_ids, teachers = _batch(2, 4, 20, 1.0)
    with torch.no_grad():
        got, terms = distillation_loss(logits, input_ids, teachers, 1.0, 1.0, chunk_positions=3)
    want, _ = _unchunked(logits, input_ids, teachers, 1.0, 1.0)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad


class _Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.hidden_projections = HiddenProjections(4, [(2, "t.a", 3, 6), (4, "tb", 8, 5)])


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_projections_train_and_are_saved(kind):
    parent = _Parent()
    x = torch.randn(2, 5, 3, generator=_gen(30))
    student_hidden = parent.body(x)
    loss = hidden_alignment_loss(
        student_hidden, torch.randn(2, 5, 6).half(), parent.hidden_projections[HiddenProjections.key(2, "t.a", 3)], kind
    ) + hidden_alignment_loss(
        student_hidden, torch.randn(2, 5, 5).half(), parent.hidden_projections[HiddenProjections.key(4, "tb", 8)], kind
    )
    loss.backward()

    for p in parent.hidden_projections.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    state = parent.state_dict()
    assert state["hidden_projections.proj.s2_t-a_3.weight"].shape == (6, 4)
    assert state["hidden_projections.proj.s4_tb_8.weight"].shape == (5, 4)
    assert "hidden_projections.proj.s4_tb_8.bias" not in state


def test_hidden_alignment_hand_checked_values():
    identity = nn.Identity()
    student = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    teacher = torch.tensor([[3.0, 2.0], [1.0, 1.0]]).half()
    assert hidden_alignment_loss(student, teacher, identity, "mse").item() == pytest.approx(1.0)  # (2² + 0·3) / 4
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 1.0], [2.0, 2.0]]).half()
    assert hidden_alignment_loss(student, teacher, identity, "cosine").item() == pytest.approx(0.5)  # (1 + 0) / 2


def test_uniform_layer_mapping():
    assert uniform_layer_mapping(16, [4, 8], 8) == [(8, 4), (16, 8)]
    assert uniform_layer_mapping(4, [0, 3, 12], 12) == [(0, 0), (1, 3), (4, 12)]
    assert uniform_layer_mapping(6, [3, 5], 12) == [(2, 3), (3, 5)]  # 1.5 -> 2, 2.5 -> 3: halves round up


def test_next_token_ce_shifts_labels():
    logits = torch.randn(2, 4, 9, generator=_gen(40))
    input_ids = torch.randint(0, 9, (2, 4), generator=_gen(41))
    log_q = torch.log_softmax(logits.double(), -1)
    want = -torch.stack([log_q[b, j, input_ids[b, j + 1]] for b in range(2) for j in range(3)]).mean()
    torch.testing.assert_close(next_token_ce(logits, input_ids).double(), want)


def test_distillation_loss_rejects_a_teacher_without_its_arrays():
    logits, input_ids, _ = _batch(1, 3, 10, 1.0)
    teacher = TeacherTargets("t", 1.0, kd_form("tail"), {"topk_ids": input_ids})
    with pytest.raises(ValueError, match="needs"):
        distillation_loss(logits, input_ids, [teacher], 0.0, 1.0)


def test_dense_kl_equals_tail_bucket_with_full_support():
    """The online baseline's dense KL is the tail-bucket KL when the top-k is the whole vocabulary."""
    torch.manual_seed(3)
    s, t = torch.randn(5, 40), torch.randn(5, 40) * 2
    T = 2.0
    vals, ids = t.topk(40, dim=-1)
    lse = torch.logsumexp(t / T, dim=-1)
    assert torch.allclose(dense_kl(s, t, T), tail_bucket_kl(s, vals, ids, lse, T), atol=1e-5)


def test_the_registry_maps_config_form_names_to_forms():
    assert {name: type(kd_form(name)).name for name in ("tail", "renorm", "sampled", "seed_exact")} == {
        "tail": "tail", "renorm": "renorm", "sampled": "sampled", "seed_exact": "seed_exact"}
    with pytest.raises(KdcacheError, match="unknown distillation form 'dense'.*renorm, sampled, seed_exact, tail"):
        kd_form("dense")


def test_each_form_declares_the_arrays_its_plan_reads():
    pairs = (HiddenPair(1, "a", 2, 8, quantized=False), HiddenPair(2, "c", 4, 8, quantized=True))
    arrays = {form: KDPlan({"a": 0.5, "b": 0.5}, form, 0.5, 2.0, {"a": 0, "b": 0}, pairs).arrays()
              for form in ("tail", "renorm", "sampled")}
    assert arrays["tail"] == {"a": ["topk_logits", "topk_ids", "lse", "hidden_2"],
                              "b": ["topk_logits", "topk_ids", "lse"], "c": ["hidden_4", "hidden_4_scale"]}
    assert arrays["renorm"]["b"] == ["topk_logits", "topk_ids"]
    assert arrays["sampled"]["b"] == ["sample_ids", "sample_counts"]


def test_seed_exact_distils_from_the_ensemble_weighted_like_babyllama():
    """BabyLlama: (1 - alpha) · KLDivLoss(batchmean) = (1 - alpha) · L · per-position mean KL; teachers unused."""
    assert kd_form("seed_exact").groups({"a": 0.25, "b": 0.25}, 0.5, 128) == {ENSEMBLE: 64.0}
    assert kd_form("tail").groups({"a": 0.25, "b": 0.0}, 0.5, 128) == {"a": 0.25}


def test_kd_loss_reads_a_dataset_batch_by_the_plan():
    logits, input_ids, teachers = _batch(2, 5, 30, 2.0)
    tail = teachers[0]
    batch = {"input_ids": input_ids, **{f"big/{key}": value for key, value in tail.arrays.items()}}
    plan = KDPlan({"big": tail.weight}, "tail", 0.3, 2.0, {"big": 0})

    got, terms = KDLoss(plan, chunk_positions=4)(logits, batch)

    want, want_terms = distillation_loss(logits, input_ids, [tail], 0.3, 2.0)
    # other chunks sum in another order: equal to float32 rounding, not bit for bit (1 torch thread differs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert terms.keys() == want_terms.keys()


class _ArgmaxForm(KDForm):
    """A form of the test's own: all the teacher's mass on its top-1 id."""

    name = "argmax"
    arrays = ("topk_ids",)

    def targets(self, arrays, vocab_size, temperature):
        ids = arrays["topk_ids"][..., :1]
        return Targets(ids, torch.ones(ids.shape), torch.zeros(ids.shape), None)

    def kl(self, student_logits, arrays, temperature):
        log_q = torch.log_softmax(student_logits.float() / temperature, -1)
        return -log_q.gather(-1, arrays["topk_ids"][..., :1].long()).squeeze(-1) * temperature**2


def test_a_new_form_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setattr(form_module, "_FORMS", dict(form_module._FORMS))
    form_module.register_kd_form(_ArgmaxForm)
    logits, input_ids, teachers = _batch(2, 4, 20, 1.0)
    batch = {"input_ids": input_ids, "t/topk_ids": teachers[0].arrays["topk_ids"]}
    plan = KDPlan({"t": 1.0}, "argmax", 0.0, 1.0, {})
    assert plan.arrays() == {"t": ["topk_ids"]}

    leaf = logits.clone().requires_grad_()
    got, _ = KDLoss(plan, chunk_positions=3)(leaf, batch)
    got.backward()
    ref = logits.clone().requires_grad_()
    want = kd_form("argmax").kl(ref, {"topk_ids": batch["t/topk_ids"]}, 1.0).mean()
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(leaf.grad, ref.grad)


def test_int8_hidden_targets_are_dequantized_as_stored_values_times_scale():
    values = torch.randint(-127, 128, (2, 3, 4), generator=_gen(50)).to(torch.int8)
    scale = torch.rand(2, 3, generator=_gen(51)).half()
    batch = {"t/hidden_1": values, "t/hidden_1_scale": scale, "u/hidden_2": values.half()}
    got = HiddenAlignment.target(batch, HiddenPair(1, "t", 1, 4, quantized=True))
    assert got.dtype == torch.float16
    assert torch.equal(got, (values.float() * scale.float().unsqueeze(-1)).half())
    assert HiddenAlignment.target(batch, HiddenPair(1, "u", 2, 4, quantized=False)) is batch["u/hidden_2"]
