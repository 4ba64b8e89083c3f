"""The cross-tokenizer forms' gradients, through KDLoss and the chunked engine, against autograd of their stated
objectives written out position by position from dense teacher logits in the teacher's own vocabulary."""

import pytest
import torch

from kdcache.precompute.targets import topk_targets
from kdcache.student.kd import KDLoss, KDPlan, kd_form
from kdcache.student.kd.xtok_chunk import binary_kl

B, L, LT, V, VT, K = 2, 7, 8, 50, 40, 6
TEMPERATURES = [1.0, 2.0]
# run position -> teacher token ending at the same byte (-1: none); strictly rising, the last tokens always aligned
ALIGN = torch.tensor([[0, -1, 2, 3, -1, -1, 6], [-1, 1, -1, 2, 4, 5, 7]])
COUNTS = [7, 8]  # teacher tokens per sequence (the rest is padding)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(seed: int):
    teacher = (torch.randn(B, LT, VT, generator=_gen(seed)) * 3).half().float()  # float16 holds them exactly
    student = torch.randn(B, L, V, generator=_gen(seed + 1)) * 2
    input_ids = torch.randint(0, V, (B, L), generator=_gen(seed + 2))
    own_ids = torch.randint(3, VT, (B, LT), generator=_gen(seed + 3))
    # teacher id -> run id with the same bytes: half of the teacher's vocabulary, distinct run ids
    mapping = torch.full((VT,), -1)
    mapped = torch.randperm(VT, generator=_gen(seed + 4))[: VT // 2]
    mapping[mapped] = torch.randperm(V, generator=_gen(seed + 5))[: len(mapped)]
    return teacher, student, input_ids, own_ids, mapping


def _prefix_map(seed: int) -> torch.Tensor:
    """Run id -> the teacher id it counts for (-1: none): several run ids per teacher id, many teacher ids unused."""
    return torch.randint(-1, VT // 2, (V,), generator=_gen(seed))


def _arrays(teacher, own_ids, temperature):
    """What the store holds per teacher token (zero past each sequence's tokens), as the dataset hands it over."""
    arrays = topk_targets(teacher, K, TEMPERATURES)
    nxt = teacher[:, :-1].gather(-1, own_ids[:, 1:, None])[..., 0]
    out = {"align": ALIGN.int(), "t_topk_logits": arrays["topk_logits"], "t_topk_ids": arrays["topk_ids"].int(),
           "t_lse": arrays["lse"][..., TEMPERATURES.index(temperature)],
           "t_next_logit": torch.cat([nxt, torch.zeros(B, 1)], dim=1)}
    for b, n in enumerate(COUNTS):
        for value in out.values():
            if value.shape[1] == LT:
                value[b, n:] = 0
        out["t_next_logit"][b, n - 1] = 0
    return out


def _grads(form, weight, hard, temperature, student, batch, objective):
    plan = KDPlan({"x": weight}, form, hard, temperature, {"x": TEMPERATURES.index(temperature)})
    s = student.clone().requires_grad_()
    KDLoss(plan, chunk_positions=5)(s, batch)[0].backward()  # chunks that cut sequences
    ref = student.double().requires_grad_()
    objective(ref).backward()
    got, want = s.grad.double(), ref.grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def _hard_ce(s, input_ids):
    log_q = torch.log_softmax(s, -1)[:, :-1].gather(-1, input_ids[:, 1:, None])
    return -log_q.mean()


def _aligned_kl_with_tail(s, teacher, temperature, pick):
    """Sum over aligned positions of KL(p || q) over the classes `pick` keeps plus one tail class, from dense
    teacher logits; pick(teacher's top-k ids, student's q) -> (the teacher ids kept, the student's q of each)."""
    total = 0
    for b in range(B):
        for j, i in enumerate(ALIGN[b].tolist()):
            if i < 0:
                continue
            p_all = torch.softmax(teacher[b, i].double() / temperature, -1)
            kept, q = pick(teacher[b, i].topk(K).indices.tolist(), torch.softmax(s[b, j] / temperature, -1))
            p = p_all[kept]
            q = torch.stack(q) if q else torch.zeros(0, dtype=torch.float64)
            p_tail, q_tail = 1 - p.sum(), 1 - q.sum()
            total = total + (p * (p.log() - q.log())).sum() + p_tail * (p_tail.log() - q_tail.log())
    return total


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_chunk_form_gradient_is_that_of_the_binarised_chunk_likelihood_kl(temperature):
    teacher, student, input_ids, own_ids, _ = _setup(40)
    weight, hard = 0.8, 0.3
    batch = {"input_ids": input_ids, **{f"x/{k}": v for k, v in _arrays(teacher, own_ids, temperature).items()}}

    def objective(s):  # chunks between consecutive aligned positions, each as two Bernoullis, mean over B·L
        log_q = torch.log_softmax(s / temperature, -1)
        log_p = torch.log_softmax(teacher.double() / temperature, -1)
        total = 0
        for b in range(B):
            bounds = [(j, int(i)) for j, i in enumerate(ALIGN[b].tolist()) if i >= 0]
            for (j0, i0), (j1, i1) in zip(bounds, bounds[1:]):
                student_ll = sum(log_q[b, t, input_ids[b, t + 1]] for t in range(j0, j1))
                teacher_ll = sum(log_p[b, t, own_ids[b, t + 1]] for t in range(i0, i1))
                total = total + binary_kl(teacher_ll, student_ll)
        return weight * temperature**2 * total / (B * L) + hard * _hard_ce(s, input_ids)

    _grads("xtok_chunk", weight, hard, temperature, student, batch, objective)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_match_form_gradient_is_that_of_the_matched_tokens_plus_tail_kl(temperature):
    teacher, student, input_ids, own_ids, mapping = _setup(50)
    weight, hard = 1.1, 0.2
    batch = {"input_ids": input_ids, "x/vocab_map": mapping,
             **{f"x/{k}": v for k, v in _arrays(teacher, own_ids, temperature).items()}}

    def matched(top, q_all):  # the teacher's top-k ids that are run ids, and the student's q of those run ids
        kept = [t for t in top if mapping[t] >= 0]
        return kept, [q_all[int(mapping[t])] for t in kept]

    def objective(s):  # at aligned positions: KL over the matched ids + one tail class
        total = _aligned_kl_with_tail(s, teacher, temperature, matched)
        return weight * temperature**2 * total / (B * L) + hard * _hard_ce(s, input_ids)

    _grads("xtok_match", weight, hard, temperature, student, batch, objective)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_projection_form_gradient_is_that_of_the_kl_in_the_teachers_vocabulary(temperature):
    teacher, student, input_ids, own_ids, mapping = _setup(70)
    prefix = _prefix_map(71)
    weight, hard = 0.9, 0.4
    batch = {"input_ids": input_ids, "x/vocab_map": mapping, "x/prefix_map": prefix,
             **{f"x/{k}": v for k, v in _arrays(teacher, own_ids, temperature).items()}}

    def projected(top, q_all):  # the top-k ids some run id counts for, and the student's q summed over those run ids
        kept = [t for t in top if (prefix == t).any()]
        return kept, [q_all[prefix == t].sum() for t in kept]

    def objective(s):  # at aligned positions: KL over the projected classes + one tail class
        total = _aligned_kl_with_tail(s, teacher, temperature, projected)
        return weight * temperature**2 * total / (B * L) + hard * _hard_ce(s, input_ids)

    _grads("xtok_project", weight, hard, temperature, student, batch, objective)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("form", ["xtok_chunk", "xtok_match", "xtok_project"])
def test_each_form_kl_is_its_engine_value(form, temperature):
    teacher, student, input_ids, own_ids, mapping = _setup(60)
    arrays = {**_arrays(teacher, own_ids, temperature), "vocab_map": mapping, "prefix_map": _prefix_map(61),
              "input_ids": input_ids}
    batch = {"input_ids": input_ids, **{f"x/{k}": v for k, v in arrays.items() if k != "input_ids"}}
    index = TEMPERATURES.index(temperature)
    terms = KDLoss(KDPlan({"x": 1.0}, form, 0.0, temperature, {"x": index}))(student, batch)[1]
    want = kd_form(form).kl(student, arrays, temperature).mean()
    torch.testing.assert_close(terms["kl/x"], want, rtol=1e-5, atol=1e-7)
    assert want > 0
