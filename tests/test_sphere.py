"""Unit tests of dti_utils' math and concept helpers against independent float64 numpy formulas.

Sphere geometry, the RiemannianSGD update of the paper (Kim et al., arXiv 2512.13672: Riemannian SGD on the unit
sphere with a von Mises-Fisher prior; the README's "Flags" table states what --rsgd_beta, --kappa and --learning_rate
do to a step), vocabulary norm statistics, --token_scale and the token/initializer rules.
"""

import copy
import io

import numpy as np
import pytest
import torch

from dti_utils import (
    DTIError,
    RiemannianSGD,
    dist,
    placeholder_token_list,
    proju,
    projx,
    resolve_token_scale,
    resolve_tokens,
    slerp,
    vocabulary_norm_stats,
)

from conftest import angle


# ----------------------------------------------------------------------------------------------------
# Independent references (float64 numpy), written from the paper (arXiv 2512.13672); the angle is conftest's
# ----------------------------------------------------------------------------------------------------


def np_unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_rsgd_step(v, grad, mu, s, t, lr, kappa, beta, eps=1e-8):
    """One step of the paper's Riemannian SGD (arXiv 2512.13672), row by row. Returns (v, s)."""
    g = grad - kappa * mu
    g = g - (g * v).sum(-1, keepdims=True) * v
    h = (g * g).sum(-1, keepdims=True)
    s = beta * s + (1 - beta) * h
    s_hat = s / (1 - beta**t)
    g = g / (np.sqrt(s_hat) + eps)
    v = v - lr * g
    return v / np.linalg.norm(v, axis=-1, keepdims=True), s


def random_unit(rows, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=-1).float()


def rotate_toward(a, b, angle):
    """Unit rows at `angle` radians from a, in the plane of a and b (float64 numpy)."""
    a, b = np_unit(a), np_unit(b)
    perp = np_unit(b - (a * b).sum(-1, keepdims=True) * a)
    return np.cos(angle) * a + np.sin(angle) * perp


# ----------------------------------------------------------------------------------------------------
# Sphere geometry
# ----------------------------------------------------------------------------------------------------


def test_projx_gives_unit_rows_with_the_same_direction():
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-3, 3, 16).unsqueeze(-1)
    x = torch.randn(16, 32, generator=g) * scales
    r = projx(x)
    norms = np.linalg.norm(r.double().numpy(), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.double().numpy(), np_unit(x.double().numpy()), atol=1e-6)
    # Projecting a unit row is (numerically) the identity.
    np.testing.assert_allclose(projx(r).numpy(), r.numpy(), atol=1e-7)


def test_proju_is_orthogonal_and_matches_formula():
    x = random_unit(10, 32, seed=1)
    u = torch.randn(10, 32, generator=torch.Generator().manual_seed(2)) * 5
    p = proju(x, u)
    xd, ud = x.double().numpy(), u.double().numpy()
    ref = ud - (ud * xd).sum(-1, keepdims=True) * xd
    np.testing.assert_allclose(p.double().numpy(), ref, atol=1e-5)
    assert np.abs((p.double().numpy() * xd).sum(-1)).max() < 1e-5
    # Projecting twice changes nothing; a radial vector projects to zero.
    np.testing.assert_allclose(proju(x, p).numpy(), p.numpy(), atol=1e-5)
    assert proju(x, 3.0 * x).abs().max().item() < 1e-6


def test_dist_matches_numpy_down_to_tiny_angles():
    a = random_unit(6, 16, seed=3) * 0.4
    b = random_unit(6, 16, seed=4) * 7.0
    np.testing.assert_allclose(dist(a, b).double().numpy(), angle(a, b), atol=1e-5)
    assert dist(a, a).abs().max().item() < 1e-6
    # 1e-4 rad apart: arccos of a float32 cosine would give 0 (or 3.5e-4); the sine part keeps it
    near = torch.from_numpy(rotate_toward(a.numpy(), b.numpy(), 1e-4)).float()
    np.testing.assert_allclose(dist(a, near).double().numpy(), 1e-4, rtol=1e-2)


def test_slerp_endpoints_midpoint_and_formula():
    a = random_unit(5, 24, seed=5)
    b = random_unit(5, 24, seed=6)
    np.testing.assert_allclose(slerp(a, b, 0.0).numpy(), a.numpy(), atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 1.0).numpy(), b.numpy(), atol=1e-6)
    mid = slerp(a, b, 0.5).double().numpy()
    ad, bd = a.double().numpy(), b.double().numpy()
    np.testing.assert_allclose(mid, np_unit(ad + bd), atol=1e-6)  # the midpoint bisects the arc
    omega = angle(ad, bd)
    np.testing.assert_allclose(angle(ad, mid), omega / 2, atol=1e-5)
    np.testing.assert_allclose(angle(bd, mid), omega / 2, atol=1e-5)
    # t = 0.3 against the slerp formula sin((1-t)W)/sin W a + sin(tW)/sin W b.
    t = 0.3
    ref = (np.sin((1 - t) * omega)[:, None] * ad + np.sin(t * omega)[:, None] * bd) / np.sin(omega)[:, None]
    np.testing.assert_allclose(slerp(a, b, t).double().numpy(), ref, atol=1e-5)
    # Inputs of any norm are interpolated by direction; the output is unit.
    np.testing.assert_allclose(slerp(a * 0.39, b * 3.0, t).double().numpy(), ref, atol=1e-5)


def test_slerp_tiny_angle_falls_back_to_normalized_lerp():
    a = random_unit(3, 16, seed=7)
    b = projx(a + 1e-8 * torch.randn(3, 16, generator=torch.Generator().manual_seed(8)))
    out = slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), a.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out.double().numpy(), axis=-1), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# RiemannianSGD
# ----------------------------------------------------------------------------------------------------


def test_rsgd_beta0_moves_every_row_by_lr_radians_whatever_the_gradient_size():
    lr = 0.01
    v0 = random_unit(8, 32, seed=10)
    p = torch.nn.Parameter(v0.clone())
    opt = RiemannianSGD([p], lr=lr, kappa=0.0, beta=0.0)
    grad = torch.randn(8, 32, generator=torch.Generator().manual_seed(11)) * torch.logspace(-3, 3, 8).unsqueeze(-1)
    p.grad = grad.clone()
    opt.step()
    moved = angle(v0, p)
    np.testing.assert_allclose(moved, lr, atol=1e-5)  # atan(lr) = lr - lr^3/3: within 1e-5 of lr
    np.testing.assert_allclose(np.linalg.norm(p.detach().double().numpy(), axis=-1), 1.0, atol=1e-6)
    ref, _ = ref_rsgd_step(
        v=v0.double().numpy(),
        grad=grad.double().numpy(),
        mu=np.zeros((8, 32)),
        s=np.zeros((8, 1)),
        t=1,
        lr=lr,
        kappa=0.0,
        beta=0.0,
    )
    np.testing.assert_allclose(p.detach().double().numpy(), ref, atol=1e-6)
    # The step goes against the gradient: the loss's first-order change is negative for every row.
    delta = p.detach().double().numpy() - v0.double().numpy()
    assert ((delta * grad.double().numpy()).sum(-1) < 0).all()


def test_rsgd_prior_alone_pulls_toward_mu():
    lr, kappa = 0.01, 1e-4
    mu = random_unit(4, 32, seed=12)
    other = random_unit(4, 32, seed=13)
    start = torch.from_numpy(rotate_toward(mu.numpy(), other.numpy(), 0.5)).float()
    p = torch.nn.Parameter(mu.clone())  # the prior is the direction at the first step (mu = v0)
    opt = RiemannianSGD([p], lr=lr, kappa=kappa, beta=0.0)
    assert len(opt.state) == 0  # state is created lazily, like torch.optim.SGD's
    p.grad = torch.zeros_like(p)
    opt.step()  # at mu, the prior's pull has no tangent component: nothing moves (but round-off over eps)
    np.testing.assert_allclose(opt.state[p]["prior"].numpy(), mu.numpy(), atol=1e-7)
    np.testing.assert_allclose(p.detach().numpy(), mu.numpy(), atol=1e-5)
    with torch.no_grad():
        p.copy_(start)
    angles = [angle(mu, p)]
    for _ in range(5):
        p.grad = torch.zeros_like(p)  # no data gradient: only the vMF prior acts
        opt.step()
        angles.append(angle(mu, p))
    angles = np.stack(angles)
    np.testing.assert_allclose(angles[0], 0.5, atol=1e-5)
    assert (np.diff(angles, axis=0) < 0).all()  # monotonically closer to mu
    # beta = 0: each step is a unit tangent step, so the angle shrinks by about lr per step.
    np.testing.assert_allclose(angles[0] - angles[-1], 5 * lr, atol=1e-4)


def test_rsgd_a_preset_prior_and_kappa_zero():
    mu = random_unit(2, 16, seed=14)
    start = torch.from_numpy(rotate_toward(mu.numpy(), random_unit(2, 16, seed=15).numpy(), 0.3)).float()
    p = torch.nn.Parameter(start.clone())
    opt = RiemannianSGD([p], lr=0.02, kappa=1.0, beta=0.0)
    opt.state[p]["prior"] = mu.clone()  # a prior set before the first step is kept (else: the first direction)
    p.grad = torch.zeros_like(p)
    opt.step()
    np.testing.assert_allclose(angle(mu, p), 0.3 - 0.02, atol=1e-4)
    # kappa = 0 and no data gradient: nothing moves.
    q = torch.nn.Parameter(start.clone())
    opt0 = RiemannianSGD([q], lr=0.02, kappa=0.0)
    opt0.state[q]["prior"] = mu.clone()
    q.grad = torch.zeros_like(q)
    opt0.step()
    assert torch.equal(q.detach(), start)


@pytest.mark.parametrize("beta,kappa", [(0.9, 0.3), (0.5, 0.0), (0.0, 0.7)])
def test_rsgd_matches_spec_reference_over_several_steps(beta, kappa):
    lr, rows, dim = 0.05, 3, 16
    v0 = random_unit(rows, dim, seed=20)
    mu = random_unit(rows, dim, seed=21)
    p = torch.nn.Parameter(v0.clone())
    opt = RiemannianSGD([p], lr=lr, kappa=kappa, beta=beta)
    opt.state[p]["prior"] = mu.clone()
    v, s = v0.double().numpy(), np.zeros((rows, 1))
    gen = torch.Generator().manual_seed(22)
    for t in range(1, 6):
        grad = torch.randn(rows, dim, generator=gen) * (10.0 ** (t - 3))  # magnitudes vary from step to step
        p.grad = grad.clone()
        opt.step()
        v, s = ref_rsgd_step(
            v=v, grad=grad.double().numpy(), mu=mu.double().numpy(), s=s, t=t, lr=lr, kappa=kappa, beta=beta
        )
        np.testing.assert_allclose(p.detach().double().numpy(), v, atol=2e-6, err_msg=f"step {t}")
    assert opt.state[p]["step"].item() == 5
    if beta > 0:
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].double().numpy(), s, rtol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rsgd_nonfinite_gradient_changes_nothing(bad):
    lr, beta, kappa = 0.05, 0.9, 0.2
    p = torch.nn.Parameter(random_unit(3, 16, seed=30))
    opt = RiemannianSGD([p], lr=lr, kappa=kappa, beta=beta)
    mu = random_unit(3, 16, seed=30).double().numpy()  # the prior: the direction at the first step
    g1 = torch.randn(3, 16, generator=torch.Generator().manual_seed(31))
    p.grad = g1.clone()
    opt.step()
    before = p.detach().clone()
    state_before = {k: v.clone() for k, v in opt.state[p].items()}
    bad_grad = torch.randn(3, 16, generator=torch.Generator().manual_seed(32))
    bad_grad[1, 5] = bad  # one bad element in one row
    p.grad = bad_grad
    opt.step()
    assert torch.equal(p.detach(), before)
    for key, value in state_before.items():
        assert torch.equal(opt.state[p][key], value), key
    # The skipped step does not count: the next finite step is step 2 of the reference.
    g2 = torch.randn(3, 16, generator=torch.Generator().manual_seed(33))
    p.grad = g2.clone()
    opt.step()
    v, s = ref_rsgd_step(
        v=random_unit(3, 16, seed=30).double().numpy(),
        grad=g1.double().numpy(),
        mu=mu,
        s=np.zeros((3, 1)),
        t=1,
        lr=lr,
        kappa=kappa,
        beta=beta,
    )
    v, s = ref_rsgd_step(v=v, grad=g2.double().numpy(), mu=mu, s=s, t=2, lr=lr, kappa=kappa, beta=beta)
    np.testing.assert_allclose(p.detach().double().numpy(), v, atol=2e-6)


def test_rsgd_state_dict_round_trip_gives_identical_next_steps():
    kwargs = {"lr": 0.03, "kappa": 0.5, "beta": 0.8}
    p = torch.nn.Parameter(random_unit(4, 16, seed=40))
    opt = RiemannianSGD([p], **kwargs)
    gen = torch.Generator().manual_seed(41)
    for _ in range(3):
        p.grad = torch.randn(4, 16, generator=gen)
        opt.step()
    buffer = io.BytesIO()  # through bytes, as a checkpoint does (a live state_dict shares tensors with opt)
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # A fresh optimizer on a parameter that starts elsewhere: its own prior would differ unless loaded.
    q = torch.nn.Parameter(random_unit(4, 16, seed=42))
    opt2 = RiemannianSGD([q], **kwargs)
    with torch.no_grad():
        q.copy_(p)
    opt2.load_state_dict(saved)
    for key in ("prior", "step", "exp_avg_sq"):
        assert torch.equal(opt2.state[q][key], opt.state[p][key]), key
    for _ in range(3):
        grad = torch.randn(4, 16, generator=gen)
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        opt2.step()
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rsgd_state_is_float32(dtype):
    p = torch.nn.Parameter(random_unit(3, 16, seed=50).to(dtype))
    opt = RiemannianSGD([p], lr=0.05, kappa=0.1, beta=0.9)
    for _ in range(2):
        p.grad = torch.randn(3, 16, generator=torch.Generator().manual_seed(51)).to(dtype)
        opt.step()
    assert p.dtype == dtype
    assert {k: v.dtype for k, v in opt.state[p].items()} == {
        "prior": torch.float32,
        "step": torch.float32,
        "exp_avg_sq": torch.float32,
    }


def test_rsgd_state_stays_float32_after_load_state_dict_for_half_parameters():
    p = torch.nn.Parameter(random_unit(3, 16, seed=52).bfloat16())
    opt = RiemannianSGD([p], lr=0.05, kappa=0.1, beta=0.9)
    p.grad = torch.randn(3, 16, generator=torch.Generator().manual_seed(53)).bfloat16()
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = RiemannianSGD([q], lr=0.05, kappa=0.1, beta=0.9)
    opt2.load_state_dict(opt.state_dict())
    assert {k: v.dtype for k, v in opt2.state[q].items()} == {
        "prior": torch.float32,
        "step": torch.float32,
        "exp_avg_sq": torch.float32,
    }
    assert torch.equal(opt2.state[q]["prior"], opt.state[p]["prior"])


def test_rsgd_rejects_bad_hyperparameters():
    p = torch.nn.Parameter(random_unit(1, 4, seed=0))
    for kwargs in ({"lr": -1.0}, {"kappa": -0.1}, {"beta": 1.0}, {"beta": -0.1}):
        with pytest.raises(ValueError):
            RiemannianSGD([p], **kwargs)


def test_rsgd_skips_parameters_without_gradient():
    p = torch.nn.Parameter(random_unit(2, 8, seed=60))
    opt = RiemannianSGD([p], lr=0.1, kappa=1.0)
    before = p.detach().clone()
    opt.step()  # p.grad is None
    assert torch.equal(p.detach(), before)
    assert "step" not in opt.state[p]


def test_rsgd_add_param_group_then_step():
    """State is created at a parameter's first step, so a group added later steps like the first one."""
    p, q = torch.nn.Parameter(random_unit(2, 8, seed=61)), torch.nn.Parameter(random_unit(3, 8, seed=62))
    opt = RiemannianSGD([p], lr=0.05, kappa=0.2, beta=0.5)
    opt.add_param_group({"params": [q], "lr": 0.02})
    grad = torch.randn(3, 8, generator=torch.Generator().manual_seed(63))
    p.grad, q.grad = torch.randn(2, 8), grad.clone()
    opt.step()
    v, s = ref_rsgd_step(
        v=random_unit(3, 8, seed=62).double().numpy(),
        grad=grad.double().numpy(),
        mu=random_unit(3, 8, seed=62).double().numpy(),
        s=np.zeros((3, 1)),
        t=1,
        lr=0.02,
        kappa=0.2,
        beta=0.5,
    )
    np.testing.assert_allclose(q.detach().double().numpy(), v, atol=2e-6)
    assert opt.state[q]["step"].item() == 1 and opt.param_groups[1]["kappa"] == 0.2  # the group's defaults filled in


# ----------------------------------------------------------------------------------------------------
# Vocabulary norm statistics and --token_scale
# ----------------------------------------------------------------------------------------------------


def test_vocabulary_norm_stats_ignores_zero_rows():
    gen = torch.Generator().manual_seed(70)
    weight = torch.randn(50, 12, generator=gen) * torch.linspace(0.1, 2.0, 50).unsqueeze(-1)
    weight[[0, 7, 49]] = 0.0  # e.g. padding rows
    stats = vocabulary_norm_stats(weight)
    norms = np.linalg.norm(weight.double().numpy(), axis=-1)
    kept = norms[norms > 0]
    assert len(kept) == 47
    assert stats["mean"] == pytest.approx(kept.mean(), rel=1e-6)
    assert stats["min"] == pytest.approx(kept.min(), rel=1e-6)
    assert stats["max"] == pytest.approx(kept.max(), rel=1e-6)
    assert stats["min"] > 0  # the zero rows would have made it 0
    assert stats["mean"] != pytest.approx(norms.mean(), rel=1e-3)


def test_vocabulary_norm_stats_of_the_tiny_encoder(base_vocab):
    weight = torch.from_numpy(base_vocab["weight"]).float()
    stats = vocabulary_norm_stats(weight)
    for key in ("mean", "min", "max"):
        assert stats[key] == pytest.approx(base_vocab[key], rel=1e-6)


def test_resolve_token_scale_values():
    stats = {"mean": 0.39, "min": 0.2, "max": 0.6}
    assert resolve_token_scale("mean", stats) == 0.39
    assert resolve_token_scale("min", stats) == 0.2
    assert resolve_token_scale("max", stats) == 0.6
    assert resolve_token_scale("0.45", stats) == 0.45
    assert resolve_token_scale("1e-1", stats) == pytest.approx(0.1)
    assert resolve_token_scale(2, stats) == 2.0


@pytest.mark.parametrize("bad", ["median", "", "0", "-0.3", "nan", "inf", "-inf", None, "0.4x"])
def test_resolve_token_scale_rejects_bad_values(bad):
    with pytest.raises(DTIError, match="--token_scale"):
        resolve_token_scale(bad, {"mean": 0.39, "min": 0.2, "max": 0.6})


# ----------------------------------------------------------------------------------------------------
# Tokens: placeholder names, initializer ids, conflicts
# ----------------------------------------------------------------------------------------------------


def test_placeholder_token_list_names():
    assert placeholder_token_list("<c>", 1) == ["<c>"]
    assert placeholder_token_list("<c>", 3) == ["<c>", "<c>_1", "<c>_2"]


def test_resolve_tokens_multi_token_initializer_gives_one_vector_per_token(tokenizer):
    vocab = tokenizer.get_vocab()
    tokens, ids = resolve_tokens(tokenizer, "<c>", "red car toy")
    assert tokens == ["<c>", "<c>_1", "<c>_2"]
    assert ids == [vocab["red</w>"], vocab["car</w>"], vocab["toy</w>"]]
    # The same with an explicit matching --num_vectors.
    assert resolve_tokens(tokenizer, "<c>", "red car toy", 3) == (tokens, ids)


def test_resolve_tokens_one_token_initializer_is_copied(tokenizer):
    toy = tokenizer.get_vocab()["toy</w>"]
    assert resolve_tokens(tokenizer, "<c>", "toy") == (["<c>"], [toy])
    assert resolve_tokens(tokenizer, "<c>", "toy", 4) == (["<c>", "<c>_1", "<c>_2", "<c>_3"], [toy] * 4)


@pytest.mark.parametrize(
    "placeholder,initializer,num_vectors,match",
    [
        ("<c>", "red car toy", 2, "--num_vectors"),  # 3 tokens but 2 vectors
        ("<c>", "red car", 5, "--num_vectors"),
        ("<c>", "toy", 0, "--num_vectors"),
        ("dog", "toy", None, "--placeholder_token 'dog'"),  # "dog</w>" is in the tiny vocabulary
        ("toy", "toy", None, "--placeholder_token 'toy'"),
        ("", "toy", None, "--placeholder_token"),
        ("   ", "toy", None, "--placeholder_token"),
        ("<my concept>", "toy", None, "--placeholder_token"),
        ("<c>", "", None, "--initializer_token"),
        ("<c>", "  ", None, "--initializer_token"),
    ],
)
def test_resolve_tokens_conflicts_raise(tokenizer, placeholder, initializer, num_vectors, match):
    with pytest.raises(DTIError, match=match):
        resolve_tokens(tokenizer, placeholder, initializer, num_vectors)


def test_resolve_tokens_initializer_that_tokenizes_to_nothing():
    class NothingTokenizer:  # e.g. a word made only of characters the tokenizer drops
        def encode(self, text, add_special_tokens=False):
            return []

        def get_vocab(self):
            return {"toy</w>": 0}

    with pytest.raises(DTIError, match="--initializer_token 'zzz' tokenizes to nothing"):
        resolve_tokens(NothingTokenizer(), "<c>", "zzz")


def test_resolve_tokens_checks_the_expanded_names(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # a private copy: the session fixture stays untouched
    tokenizer.add_tokens(["<c>_2"])
    resolve_tokens(tokenizer, "<c>", "toy", 2)  # <c>, <c>_1 are free
    with pytest.raises(DTIError, match="<c>_2"):
        resolve_tokens(tokenizer, "<c>", "toy", 3)
