"""Each KD form's gradient, through the cached arrays and KDLoss, against autograd of its stated dense objective."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache.cache.schema import ENSEMBLE
from kdcache.precompute.targets import hidden_targets, sample_counts, topk_targets
from kdcache.student.kd import KDLoss, KDPlan, kd_form
from kdcache.student.kd.hidden import HiddenAlignment, HiddenPair
from kdcache.student.kd.sampled import SampledForm

B, L, V, K = 2, 5, 50, 8
TEMPERATURES = [1.0, 2.0]  # the cache's lse columns
F16_EPS = 2.0**-11  # float16 round-to-nearest relative error


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    """Dense teacher logits [B, L, V], float32 values that float16 holds exactly: the cached top-k (float16) is then
    the dense logits themselves, and what remains between the two sides is float32 arithmetic (lse, softmax)."""
    return (torch.randn(B, L, V, generator=_gen(seed)) * scale).half().float()


def _batch(group: str, arrays: dict, temperature: float, input_ids: torch.Tensor) -> dict:
    """As DistillDataset hands a batch to the loss: "<group>/<array>", ids and counts int32 (stored uint16), top-k
    logits float16, lse reduced to its column at the distillation temperature."""
    batch = {"input_ids": input_ids.long()}
    for name, value in arrays.items():
        if name == "lse":
            value = value[..., TEMPERATURES.index(temperature)]
        elif name in ("topk_ids", "sample_ids", "sample_counts"):
            value = value.to(torch.int32)
        batch[f"{group}/{name}"] = value
    return batch


def _kd_grad(plan: KDPlan, student: torch.Tensor, batch: dict) -> torch.Tensor:
    """d(total)/d(student logits) of the production loss, float32 logits."""
    s = student.clone().requires_grad_()
    KDLoss(plan)(s, batch)[0].backward()
    return s.grad.double()


def _ref_grad(objective, student: torch.Tensor) -> torch.Tensor:
    """Autograd of `objective` at the student logits, in float64."""
    s = student.double().requires_grad_()
    objective(s).backward()
    return s.grad


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    # float32 throughout the production path: 1e-5 relative, and 1e-6 of the gradient's scale for near-zero entries
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6 * want.abs().max().item())


def _setup(seed: int):
    teacher = _logits(seed)
    student = torch.randn(B, L, V, generator=_gen(seed + 1)) * 2
    input_ids = torch.randint(0, V, (B, L), generator=_gen(seed + 2))
    return teacher, student, input_ids


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tail_gradient_is_that_of_the_k_plus_1_class_kl(temperature):
    teacher, student, input_ids = _setup(10)
    weight = 0.7
    batch = _batch("t", topk_targets(teacher, K, TEMPERATURES), temperature, input_ids)
    plan = KDPlan({"t": weight}, "tail", 0.0, temperature, {"t": TEMPERATURES.index(temperature)})

    def objective(s):  # T^2 · KL over the teacher's top-k ids plus one tail class, mean over positions
        t = teacher.double()
        ids = t.topk(K, dim=-1).indices
        p, q = (torch.softmax(x / temperature, -1).gather(-1, ids) for x in (t, s))
        p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
        kl = (p * (p.log() - q.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
        return weight * temperature**2 * kl.mean()

    _close(_kd_grad(plan, student, batch), _ref_grad(objective, student))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_renorm_gradient_is_that_of_the_renormalised_topk_cross_entropy(temperature):
    teacher, student, input_ids = _setup(20)
    weight = 1.3
    arrays = topk_targets(teacher, K, TEMPERATURES)
    del arrays["lse"]  # the renorm form reads no lse
    batch = _batch("t", arrays, temperature, input_ids)
    plan = KDPlan({"t": weight}, "renorm", 0.0, temperature, {"t": TEMPERATURES.index(temperature)})

    def objective(s):  # p renormalised over the top-k, q = softmax(s/T) over the full vocabulary at those ids
        top, ids = teacher.double().topk(K, dim=-1)
        log_p = torch.log_softmax(top / temperature, -1)
        log_q = torch.log_softmax(s / temperature, -1).gather(-1, ids)
        return weight * temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    _close(_kd_grad(plan, student, batch), _ref_grad(objective, student))


def _mean_sampled_grad(teacher, student, input_ids, drawn_at: float, temperature: float, draws: int, reps: int):
    """The production gradient averaged over `reps` independent sets of `draws` cached samples per position."""
    plan = KDPlan({"t": 1.0}, "sampled", 0.0, temperature, {"t": TEMPERATURES.index(temperature)})
    gen, total = _gen(31), torch.zeros(B, L, V, dtype=torch.float64)
    for _ in range(reps):
        ids, counts = sample_counts(teacher, draws, drawn_at, gen)
        batch = _batch("t", {"sample_ids": ids, "sample_counts": counts}, temperature, input_ids)
        total += _kd_grad(plan, student, batch)
    return total / reps


def test_sampled_gradient_is_the_dense_kl_gradient_in_expectation():
    teacher, student, input_ids = _setup(30)
    temperature, draws, reps = 2.0, 64, 300

    def dense(s):  # T^2 · KL(softmax(t/T) || softmax(s/T)), mean over positions
        log_p = torch.log_softmax(teacher.double() / temperature, -1)
        log_q = torch.log_softmax(s / temperature, -1)
        return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    want = _ref_grad(dense, student)
    # Per position the gradient is (T/N)·(q - p̂) with p̂ = counts / draws, so entry j of the mean over n = draws·reps
    # draws has standard deviation (T/N)·sqrt(p_j (1 - p_j) / n). The 1/n² floor covers ids so rare that they are
    # drawn once or twice in all: their error is (T/N)·count/n, not Gaussian.
    n, p = draws * reps, torch.softmax(teacher.double() / temperature, -1)
    sigma = temperature / (B * L) * torch.sqrt(p * (1 - p) / n + 1 / n**2)

    z = (_mean_sampled_grad(teacher, student, input_ids, temperature, temperature, draws, reps) - want) / sigma
    assert z.abs().max() < 6, f"max |z| = {z.abs().max():.2f} over {z.numel()} entries: biased or too noisy"
    assert 0.5 < (z**2).mean() < 1.5  # the spread is the multinomial one: nothing else adds noise

    # Draws at T=1 under a loss at T=2 estimate softmax(t/1), not softmax(t/2): the same check fails by far.
    z = (_mean_sampled_grad(teacher, student, input_ids, 1.0, temperature, draws, reps) - want) / sigma
    assert z.abs().max() > 50
    # ... which is why a store whose samples were drawn at another temperature is refused for the sampled form
    assert "T=1.0" in SampledForm().refuse({"samples": draws, "sample_temperature": 1.0}, temperature)
    assert SampledForm().refuse({"samples": draws, "sample_temperature": temperature}, temperature) is None


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_seed_exact_gradient_is_babyllama_kldivloss_plus_ce(temperature):
    mean, student, input_ids = _setup(40)
    # Two teachers whose float32 mean is exactly `mean` (float16-exact): the cached ensemble (k = V) is exact.
    delta = torch.randn(B, L, V, generator=_gen(43)).half().float()
    teachers = [mean + delta, mean - delta]
    ensemble = (teachers[0] + teachers[1]) / len(teachers)  # as precompute.targets.batch_targets averages them
    assert torch.equal(ensemble, mean)
    alpha = 0.3
    weights = kd_form("seed_exact").groups({"a": 1.0, "b": 1.0}, alpha, L)
    assert weights == {ENSEMBLE: pytest.approx((1 - alpha) * L)}
    batch = _batch(ENSEMBLE, topk_targets(ensemble, V, TEMPERATURES), temperature, input_ids)
    plan = KDPlan(weights, "seed_exact", alpha, temperature, {ENSEMBLE: TEMPERATURES.index(temperature)})

    def babyllama(s):  # alpha · CE + (1 - alpha) · T^2 · KLDivLoss(batchmean) on [B, L, V], from the dense teachers
        dense = (teachers[0].double() + teachers[1].double()) / 2
        kd = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temperature, -1),
                                                 F.softmax(dense / temperature, -1))
        ce = F.cross_entropy(s[:, :-1].reshape(-1, V), input_ids[:, 1:].reshape(-1))
        return alpha * ce + (1 - alpha) * temperature**2 * kd

    _close(_kd_grad(plan, student, batch), _ref_grad(babyllama, student))


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_gradient_is_that_of_the_stated_alignment(kind, dtype):
    ds, dt, layers = 12, 16, [(1, 2), (2, 4)]  # (student layer, teacher layer)
    student_hidden = [torch.randn(B, L, ds, generator=_gen(50 + i)) for i in range(3)]
    teacher_hidden = {l: torch.randn(B, L, dt, generator=_gen(60 + l)) * 2 for _, l in layers}
    batch = {"input_ids": torch.zeros(B, L, dtype=torch.long)}
    for l, h in teacher_hidden.items():  # as precompute stores them (float16, or int8 with a float16 scale)
        batch.update({f"t/{name}": a for name, a in hidden_targets(h, l, dtype).items()})
    pairs = [HiddenPair(s, "t", l, dt, quantized=dtype == "int8") for s, l in layers]
    align = HiddenAlignment(pairs, kind, ds)
    weights = [align.projections[k].weight for k in align.projections.proj]
    with torch.no_grad():  # seeded projections (nn.Linear's own init draws from the global RNG)
        for i, w in enumerate(weights):
            w.copy_(torch.randn(w.shape, generator=_gen(70 + i)) / math.sqrt(ds))

    hs = [h.clone().requires_grad_() for h in student_hidden]
    align(hs, batch).backward()
    got = [hs[s].grad.double() for s, _ in layers] + [w.grad.double() for w in weights]

    # The stated objective in float64 from the dense teacher hidden states: mean over pairs of mse(projected, teacher)
    # or of the mean over positions of 1 - cos(projected, teacher).
    hs64 = [h.double().requires_grad_() for h in student_hidden]
    w64 = [w.detach().double().requires_grad_() for w in weights]
    terms, bounds = [], []
    for (s, l), w in zip(layers, w64):
        pred, target = hs64[s] @ w.T, teacher_hidden[l].double()
        if kind == "mse":
            terms.append(((pred - target) ** 2).mean())
        else:
            terms.append((1 - F.cosine_similarity(pred, target, dim=-1)).mean())
        # Storage error per element: float16 rounding; int8 adds half a quantisation step (scale/2), the rounding of
        # the scale itself (absmax·2^-11, via the clamp at 127) and the float16 rounding of the dequantised value.
        err = F16_EPS * target.abs()
        if dtype == "int8":
            absmax = target.abs().amax(-1, keepdim=True)
            err = err + (absmax / 127) * (1 + F16_EPS) / 2 + absmax * F16_EPS
        # Bound on the change of d(term)/d(pred) per position from a target error of norm e (exact for mse;
        # for cosine: |Δ(t/|t|)| <= 2e/|t| and |Δcos| <= 2e/|t| in -(t/|t| - cos·pred/|pred|) / (|pred| · positions)).
        e, n_pos = err.norm(dim=-1), B * L
        if kind == "mse":
            d_pred = 2 * e / pred.numel()
        else:
            d_pred = 4 * e / (target.norm(dim=-1) * pred.detach().norm(dim=-1) * n_pos)
        d_pred = d_pred / len(layers)  # the mean over pairs
        bounds.append((d_pred * torch.linalg.matrix_norm(w.detach(), ord=2), d_pred, hs64[s].detach()))
    torch.stack(terms).mean().backward()
    want = [hs64[s].grad for s, _ in layers] + [w.grad for w in w64]

    # Student hidden states: per-position norm within |W|_2 · the pred bound (+ float32 slack).
    for g, r, (bound, _, _) in zip(got, want, bounds):
        diff = (g - r).norm(dim=-1)
        assert (diff <= bound + 1e-5 * r.norm(dim=-1).max()).all(), f"{kind}/{dtype}: {(diff / bound).max():.2f}"
    # Projection weights: Frobenius norm within sum over positions of the pred bound · |h| (+ float32 slack).
    for g, r, (_, d_pred, h) in zip(got[len(layers):], want[len(layers):], bounds):
        bound = (d_pred * h.norm(dim=-1)).sum()
        assert (g - r).norm() <= bound + 1e-5 * r.norm(), f"{kind}/{dtype}: {(g - r).norm() / bound:.2f}"
    # And the bound is not vacuous: it is small against the gradient itself (worst-case, so int8 with cosine reaches
    # ~8% of the largest per-position norm; the measured differences stay near 0.5% and within a third of it).
    assert all(b[0].max() < 0.1 * r.norm(dim=-1).max() for b, r in zip(bounds, want))
