import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orthograd.geometry import project_out


def _max_cos(direction: torch.Tensor, G: torch.Tensor, reference: torch.Tensor | None = None) -> float:
    """Largest |<row, direction>| / (|row| |reference|); reference defaults to direction itself."""
    reference = direction if reference is None else reference
    dots = (G.double() @ direction.double()).abs()
    scale = G.double().norm(dim=1) * reference.double().norm()
    mask = scale > 0
    return float((dots[mask] / scale[mask]).max()) if mask.any() else 0.0


@pytest.mark.parametrize("method", ["qr", "gram", "auto"])
def test_result_is_orthogonal_to_every_row_float32(method):
    torch.manual_seed(0)
    G, g = torch.randn(16, 300), torch.randn(300)
    out = project_out(g, G, method=method)
    assert out.dtype == torch.float32
    assert _max_cos(out, G) < 1e-5
    assert out.norm() > 0.5 * g.norm()  # 16 of 300 directions removed: most of g survives


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_idempotent(method):
    torch.manual_seed(1)
    G, g = torch.randn(8, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    once = project_out(g, G, method=method)
    torch.testing.assert_close(project_out(once, G, method=method), once, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["qr", "gram", "auto"])
def test_zero_G_leaves_g_unchanged(method):
    g = torch.randn(20)
    torch.testing.assert_close(project_out(g, torch.zeros(4, 20), method=method), g)


@pytest.mark.parametrize("method", ["qr", "gram", "auto"])
def test_g_in_span_projects_to_zero(method):
    torch.manual_seed(2)
    G = torch.randn(5, 40, dtype=torch.float64)
    g = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.7], dtype=torch.float64) @ G
    assert project_out(g, G, method=method).norm() < 1e-10 * g.norm()


def test_qr_and_gram_agree_and_match_closed_form():
    torch.manual_seed(3)
    G, g = torch.randn(12, 200, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    expected = g - G.T @ torch.linalg.solve(G @ G.T, G @ g)
    torch.testing.assert_close(project_out(g, G, method="qr"), expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(project_out(g, G, method="gram"), expected, rtol=1e-9, atol=1e-10)


def test_dependent_and_zero_rows_do_not_over_project():
    torch.manual_seed(4)
    base = torch.randn(3, 30, dtype=torch.float64)
    G = torch.cat([base, base[:1] + base[1:2], torch.zeros(1, 30, dtype=torch.float64), 2 * base[2:3]])
    g = torch.randn(30, dtype=torch.float64)
    expected = g - base.T @ torch.linalg.solve(base @ base.T, base @ g)  # projection on the true rank-3 span
    for method in ("qr", "gram", "auto"):
        torch.testing.assert_close(project_out(g, G, method=method), expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["qr", "gram", "auto"])
def test_more_rows_than_dimensions_gives_zero(method):
    torch.manual_seed(5)
    G, g = torch.randn(10, 6), torch.randn(6)
    assert project_out(g, G, method=method).norm() < 1e-5 * g.norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    torch.manual_seed(6)
    G, g = torch.randn(4, 64), torch.randn(64)
    out = project_out(g.to(dtype), G.to(dtype))
    assert out.dtype == dtype
    reference = project_out(g.to(dtype).float(), G.to(dtype).float(), method="qr")
    assert (out.float() - reference).norm() < 2e-2 * reference.norm()


def test_per_tensor_scope_equals_loop_over_tensors():
    torch.manual_seed(7)
    g = {"w": torch.randn(6, 5), "b": torch.randn(3)}
    G = {"w": torch.randn(4, 6, 5), "b": torch.randn(4, 3)}
    out = project_out(g, G, scope="per_tensor")
    for name in g:
        expected = project_out(g[name].reshape(-1), G[name].reshape(4, -1), method="qr").view_as(g[name])
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    assert out["b"].norm() < 1e-5  # 3 entries, 4 retain samples: nothing of the forget gradient survives


def test_global_scope_on_dicts_equals_flat_projection():
    torch.manual_seed(8)
    g = {"w": torch.randn(6, 5), "b": torch.randn(3)}
    G = {"w": torch.randn(4, 6, 5), "b": torch.randn(4, 3)}
    out = project_out(g, G)
    flat = project_out(torch.cat([g["w"].reshape(-1), g["b"]]), torch.cat([G["w"].reshape(4, -1), G["b"]], dim=1))
    torch.testing.assert_close(torch.cat([out["w"].reshape(-1), out["b"]]), flat)
    assert out["b"].norm() > 0  # global scope keeps forget components in small tensors


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="method must be one of"):
        project_out(torch.zeros(3), torch.zeros(1, 3), method="svd")
    with pytest.raises(ValueError, match="shape"):
        project_out(torch.zeros(3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="same keys"):
        project_out({"a": torch.zeros(2)}, {"b": torch.zeros(1, 2)})


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(min_value=1, max_value=12),
    d=st.integers(min_value=1, max_value=40),
    rank=st.integers(min_value=0, max_value=12),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_property_orthogonal_and_minimal_change(k, d, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    rank = min(rank, k, d)
    G = torch.randn(k, rank, dtype=torch.float64, generator=gen) @ torch.randn(
        rank, d, dtype=torch.float64, generator=gen
    )
    g = torch.randn(d, dtype=torch.float64, generator=gen)
    for method in ("qr", "gram", "auto"):
        out = project_out(g, G, method=method)
        assert _max_cos(out, G, reference=g) < 1e-7
        # g - out lies in span(G): projecting it out leaves (almost) nothing
        removed = g - out
        assert project_out(removed, G, method="qr").norm() <= 1e-7 * max(1.0, float(g.norm()))
        assert out.norm() <= g.norm() * (1 + 1e-12)
