"""ROAD's noisy linear imputation against a scipy sparse direct solve of its definition."""

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ptame.metrics.imputation.noisy_linear as imputation
from ptame.metrics.imputation import ATOL, ImputationNotConvergedError, noisy_linear_imputation

WEIGHTS = {  # ROAD: 1/6 for the direct neighbours, 1/12 for the diagonal ones
    (-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
    (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12,
}


def reference(image: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    """(C, H, W) float64: each removed pixel = normalised weighted mean of its 8 neighbours.

    For removed pixel i: (sum of in-image weights) x_i - sum_{removed j} w_ij x_j
    = sum_{kept j} w_ij v_j, solved by a sparse direct solver.
    """
    values, known = image.double().numpy(), keep.numpy()
    height, width = known.shape
    rows, cols = np.nonzero(~known)
    count = rows.size
    index = np.full(known.shape, -1)
    index[rows, cols] = np.arange(count)
    diagonal, rhs = np.zeros(count), np.zeros((count, values.shape[0]))
    equations, unknowns, weights = [np.arange(count)], [np.arange(count)], []
    for (di, dj), weight in WEIGHTS.items():
        a, b = rows + di, cols + dj
        inside = (a >= 0) & (a < height) & (b >= 0) & (b < width)
        diagonal[inside] += weight
        equation, a, b = np.nonzero(inside)[0], a[inside], b[inside]
        kept = known[a, b]
        rhs[equation[kept]] += weight * values[:, a[kept], b[kept]].T
        equations.append(equation[~kept])
        unknowns.append(index[a[~kept], b[~kept]])
        weights.append(np.full(int((~kept).sum()), -weight))
    coordinates = (np.concatenate(equations), np.concatenate(unknowns))
    matrix = scipy.sparse.coo_matrix(
        (np.concatenate([diagonal, *weights]), coordinates), shape=(count, count)
    ).tocsc()
    out = values.copy()
    if count:
        out[:, rows, cols] = scipy.sparse.linalg.spsolve(matrix, rhs).reshape(count, -1).T
    return out


def random_case(batch, channels, height, width, removed, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, height, width, generator=generator)
    keep = torch.rand(batch, height, width, generator=generator) >= removed
    keep.view(batch, -1)[:, 0] = True  # at least one kept pixel per image
    return images, keep


def assert_matches_reference(images, keep, tolerance=ATOL):
    out = noisy_linear_imputation(images, keep, noise_std=0.0)
    for image, mask, imputed in zip(images, keep, out):
        error = np.abs(imputed.double().numpy() - reference(image, mask)).max()
        assert error <= tolerance, error
    return out


def test_centre_pixel_is_the_weighted_mean_of_its_8_neighbours():
    image = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3) / 10
    keep = torch.ones(1, 3, 3, dtype=torch.bool)
    keep[0, 1, 1] = False
    out = noisy_linear_imputation(image, keep, noise_std=0.0)
    v = image[0, 0]
    direct = v[0, 1] + v[1, 0] + v[1, 2] + v[2, 1]
    diagonal = v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2]
    assert out[0, 0, 1, 1].item() == pytest.approx((direct / 6 + diagonal / 12).item(), abs=1e-6)


def test_corner_pixel_is_normalised_over_its_3_in_image_neighbours():
    image = torch.tensor([[0.9, 0.2, 0.7], [0.4, 0.8, 0.1], [0.3, 0.6, 0.5]]).view(1, 1, 3, 3)
    keep = torch.ones(1, 3, 3, dtype=torch.bool)
    keep[0, 0, 0] = False
    out = noisy_linear_imputation(image, keep, noise_std=0.0)
    expected = (0.2 / 6 + 0.4 / 6 + 0.8 / 12) / (1 / 6 + 1 / 6 + 1 / 12)
    assert out[0, 0, 0, 0].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("removed", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(12, 12), (17, 23), (40, 40), (1, 30), (30, 1), (2, 9)])
def test_matches_sparse_direct_solve(shape, removed):
    images, keep = random_case(2, 3, *shape, removed, seed=hash((shape, removed)) % 1000)
    assert_matches_reference(images, keep)


def test_isolated_pixels_border_frame_and_near_total_removal():
    height, width = 24, 31
    images, _ = random_case(4, 2, height, width, 0.0, seed=3)
    keep = torch.ones(4, height, width, dtype=torch.bool)
    keep[0, ::3, ::2] = False  # isolated single pixels, touching the border
    keep[1, 0, :] = keep[1, -1, :] = keep[1, :, 0] = keep[1, :, -1] = False  # 1-pixel-wide frame
    keep[2] = False  # all but one interior pixel removed
    keep[2, 10, 20] = True
    keep[3, :, :5] = False  # a band along the left edge
    assert_matches_reference(images, keep)


def test_smooth_saliency_masks_on_a_larger_image():
    generator = torch.Generator().manual_seed(5)
    size = 40
    saliency = torch.nn.functional.interpolate(
        torch.rand(1, 1, 5, 5, generator=generator), size=(size, size), mode="bilinear"
    ).flatten()
    order = saliency.argsort(descending=True)
    keep = torch.ones(4, size * size, dtype=torch.bool)
    for row, (fraction, lerf) in enumerate([(0.1, False), (0.9, False), (0.3, True), (0.9, True)]):
        count = int(fraction * size * size)
        keep[row, order[-count:] if lerf else order[:count]] = False
    images = torch.rand(4, 3, size, size, generator=generator)
    assert_matches_reference(images, keep.view(4, size, size))


def test_kept_pixels_are_returned_bit_exact_and_nothing_removed_is_identity():
    images, keep = random_case(3, 3, 20, 20, 0.5, seed=7)
    out = noisy_linear_imputation(images, keep, noise_std=0.05)
    assert torch.equal(out.permute(0, 2, 3, 1)[keep], images.permute(0, 2, 3, 1)[keep])
    everything = torch.ones_like(keep)
    assert torch.equal(noisy_linear_imputation(images, everything, noise_std=0.05), images)


def test_noise_is_on_imputed_pixels_only_with_the_right_std_and_reproducible():
    images, keep = random_case(2, 3, 64, 64, 0.5, seed=11)
    exact = noisy_linear_imputation(images, keep, noise_std=0.0)
    noisy = noisy_linear_imputation(images, keep, 0.02, torch.Generator().manual_seed(1))
    again = noisy_linear_imputation(images, keep, 0.02, torch.Generator().manual_seed(1))
    other = noisy_linear_imputation(images, keep, 0.02, torch.Generator().manual_seed(2))
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    removed = (~keep)[:, None].expand_as(images)
    noise = (noisy - exact)[removed]
    assert noise.numel() > 10_000
    assert noise.std().item() == pytest.approx(0.02, rel=0.05)
    assert abs(noise.mean().item()) < 0.02 * 5 / noise.numel() ** 0.5
    assert torch.equal(noisy[~removed], images[~removed])


def test_an_image_with_every_pixel_removed_is_filled_with_zero_plus_noise():
    images, keep = random_case(3, 3, 16, 16, 0.5, seed=13)
    keep[1] = False
    out = noisy_linear_imputation(images, keep, noise_std=0.0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    others = noisy_linear_imputation(images[[0, 2]], keep[[0, 2]], noise_std=0.0)
    assert torch.allclose(out[[0, 2]], others, atol=2 * ATOL, rtol=0)
    noisy = noisy_linear_imputation(images, keep, 0.1, torch.Generator().manual_seed(0))
    assert noisy[1].std().item() == pytest.approx(0.1, rel=0.15)


def test_dtype_and_half_precision_inputs():
    images, keep = random_case(1, 2, 10, 10, 0.5, seed=17)
    double = noisy_linear_imputation(images.double(), keep, noise_std=0.0)
    assert double.dtype == torch.float64
    assert np.abs(double[0].numpy() - reference(images[0], keep[0])).max() <= ATOL
    half = noisy_linear_imputation(images.half(), keep, noise_std=0.0)
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), double.float(), atol=2e-3)


KEEP4 = torch.ones(1, 4, 4, dtype=torch.bool)


@pytest.mark.parametrize(
    ("images", "keep", "kwargs", "message"),
    [
        (torch.rand(3, 8, 8), torch.ones(3, 8, 8, dtype=torch.bool), {}, "shape"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8), {}, "bool"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 8, 7, dtype=torch.bool), {}, "shape"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 1, 8, 8, dtype=torch.bool), {}, "shape"),
        (torch.full((1, 1, 4, 4), float("nan")), KEEP4, {}, "NaN"),
        (torch.full((1, 1, 4, 4), float("inf")), KEEP4, {}, "infinite"),
        (torch.ones(1, 1, 4, 4, dtype=torch.uint8), KEEP4, {}, "floating"),
        (torch.rand(1, 1, 4, 4), KEEP4, {"noise_std": -1.0}, "noise_std"),
        (torch.rand(1, 1, 4, 4), KEEP4, {"noise_std": float("nan")}, "noise_std"),
        (torch.rand(1, 1, 4, 4), KEEP4, {"generator": 3}, "generator"),
    ],
)
def test_invalid_inputs_are_refused(images, keep, kwargs, message):
    with pytest.raises(ValueError, match=message):
        noisy_linear_imputation(images, keep, **kwargs)


def test_multigrid_converges_in_few_iterations_at_90_percent_removal(monkeypatch):
    generator = torch.Generator().manual_seed(29)
    size = 96
    saliency = torch.nn.functional.interpolate(
        torch.rand(2, 1, 6, 6, generator=generator), size=(size, size), mode="bilinear"
    ).flatten(1)
    keep = torch.ones(2, size * size, dtype=torch.bool)
    order = saliency.argsort(dim=1)
    keep.scatter_(1, order[:, : int(0.9 * size * size)], False)
    images = torch.rand(2, 3, size, size, generator=generator)
    monkeypatch.setattr(imputation, "MAX_ITERATIONS", 15)  # Jacobi-CG would need hundreds
    assert_matches_reference(images, keep.view(2, size, size))


@pytest.mark.parametrize("shape", [(9, 12), (1, 20), (13, 2)])
def test_coarse_operators_are_galerkin_products(shape):
    """The assembled coarse operator equals P^T A P, on two levels (private API)."""
    torch.manual_seed(31)
    height, width = shape
    removed = torch.rand(1, height, width) > 0.3
    geometry = imputation._neighbour_sum(imputation._pad(torch.ones(1, 1, height, width)))
    work = imputation._Workspace(torch.device("cpu"))
    level = imputation._FineLevel.build(removed, geometry)
    operator = dense_operator(level, work) * removed.flatten().numpy()[:, None]
    for _ in range(2):
        h, w = level.shape
        coarse = (h // 2 + 1 if h > 2 else h, w // 2 + 1 if w > 2 else w)
        grid = imputation._Grid(coarse, h > 2, w > 2)
        rows, cols = bilinear(h, coarse[0], h > 2), bilinear(w, coarse[1], w > 2)
        interpolation = np.kron(rows, cols)
        if isinstance(level, imputation._FineLevel):
            interpolation = interpolation * removed.flatten().numpy()[:, None]
        expected = interpolation.T @ operator @ interpolation
        level = imputation._galerkin(level, grid, work)
        operator = dense_operator(level, work)
        assert np.abs(operator - expected).max() < 1e-5


def dense_operator(level, work) -> np.ndarray:
    h, w = level.shape
    nodes = h * w
    basis = imputation._pad(torch.eye(nodes).view(1, nodes, h, w))
    if isinstance(level, imputation._FineLevel):
        basis = basis * level.mask
    applied = level.apply(basis, torch.empty(1, nodes, h + 2, w + 2), work)
    return applied[0, :, 1:-1, 1:-1].reshape(nodes, nodes).double().numpy().T


def bilinear(fine: int, coarse: int, halve: bool) -> np.ndarray:
    matrix = np.zeros((fine, coarse))
    for node in range(fine):
        if not halve:
            matrix[node, node] = 1.0
        elif node % 2 == 0:
            matrix[node, node // 2] = 1.0
        else:
            matrix[node, node // 2 : node // 2 + 2] = 0.5
    return matrix


def test_non_convergence_raises(monkeypatch):
    images, keep = random_case(1, 1, 40, 40, 0.9, seed=19)
    monkeypatch.setattr(imputation, "MAX_ITERATIONS", 1)
    with pytest.raises(ImputationNotConvergedError, match="did not converge"):
        noisy_linear_imputation(images, keep, noise_std=0.0)


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 12),
    width=st.integers(1, 12),
    channels=st.integers(1, 2),
    removed=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_imputed_values_obey_the_maximum_principle(height, width, channels, removed, seed):
    images, keep = random_case(1, channels, height, width, removed, seed)
    out = noisy_linear_imputation(images, keep, noise_std=0.0)
    known = images[0][:, keep[0]]
    low, high = known.amin(dim=1)[:, None], known.amax(dim=1)[:, None]
    imputed = out[0][:, ~keep[0]]
    assert (imputed >= low - ATOL).all() and (imputed <= high + ATOL).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images, keep = random_case(6, 3, 48, 40, 0.7, seed=23)
    cpu = noisy_linear_imputation(images, keep, noise_std=0.0)
    cuda = noisy_linear_imputation(images.cuda(), keep.cuda(), noise_std=0.0)
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=2 * ATOL, rtol=0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    noisy = noisy_linear_imputation(images.cuda(), keep.cuda(), 0.01, generator)
    assert torch.equal(noisy.cpu().permute(0, 2, 3, 1)[keep], images.permute(0, 2, 3, 1)[keep])


EXTREME_MASKS = {
    "two kept corners": lambda keep: keep.__setitem__((0, 0), True) or keep.__setitem__((-1, -1), True),
    "one kept pixel": lambda keep: keep.__setitem__((40, 21), True),
    "one kept row": lambda keep: keep.__setitem__(0, True),
    "checkerboard": lambda keep: keep.copy_((torch.arange(96)[:, None] + torch.arange(96)) % 2 == 0),
}


@pytest.mark.parametrize("name", sorted(EXTREME_MASKS))
def test_extreme_masks_are_solved_where_the_reference_solves(name):
    """Near-singular systems (1 or 2 kept pixels: ||A^-1 1|| ~ 1e4 or more) need float64
    refinement beyond float32's precision floor: the stalled recurrence is restarted from the
    exact residual."""
    keep = torch.zeros(96, 96, dtype=torch.bool)
    EXTREME_MASKS[name](keep)
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    assert_matches_reference(images, keep[None])


def test_two_kept_pixels_of_a_224_image_converge():
    keep = torch.zeros(1, 224, 224, dtype=torch.bool)
    keep[0, 0, 0] = keep[0, -1, -1] = True
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    out = noisy_linear_imputation(image, keep, noise_std=0.0)
    corners = image[0, :, [0, -1], [0, -1]]
    assert torch.all(out[0] >= corners.min(dim=1).values.view(3, 1, 1) - ATOL)  # a weighted mean
    assert torch.all(out[0] <= corners.max(dim=1).values.view(3, 1, 1) + ATOL)


def test_host_reads_do_not_grow_with_images_or_iterations(monkeypatch):
    """The 14 ROAD imputations of one 224 px image on the CPU: <= 10 host reads (scalar reads,
    nonzero, tolist) in all, whatever the iterations each needs."""
    generator = torch.Generator().manual_seed(7)
    saliency = torch.nn.functional.interpolate(torch.rand(1, 1, 7, 7, generator=generator),
                                               size=(224, 224), mode="bilinear").flatten()
    order = saliency.argsort(descending=True)
    masks = []
    for ranked in (order, order.flip(0)):
        for percentage in (10, 20, 30, 40, 50, 70, 90):
            keep = torch.ones(224 * 224, dtype=torch.bool)
            keep[ranked[: round(224 * 224 * percentage / 100)]] = False
            masks.append(keep.view(224, 224))
    images = torch.rand(1, 3, 224, 224, generator=generator).expand(14, 3, 224, 224).contiguous()
    calls = {"tolist": 0}
    original = torch.Tensor.tolist

    def counting(self):
        calls["tolist"] += 1
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    with torch.profiler.profile() as profile:
        noisy_linear_imputation(images, torch.stack(masks), noise_std=0.0)
    names = [event.name for event in profile.events()]
    reads = names.count("aten::_local_scalar_dense") + names.count("aten::nonzero") + calls["tolist"]
    assert 0 < reads <= 10, (reads, calls, names.count("aten::_local_scalar_dense"), names.count("aten::nonzero"))


def test_the_cuda_graph_schedule_replays_exactly_the_eager_iterations(monkeypatch):
    """The CUDA-graph path's control flow, on CPU with stand-ins for torch.cuda: a capture records
    one CG step without running it and a replay runs it. Recaptures follow every state change
    (torsion channel dropped, rows retired), and the values are the eager solver's, bit for bit.
    (The real graphs are checked against the eager solver in tests/test_gpu.py.)"""
    import contextlib

    from ptame.metrics.imputation import noisy_linear as solver

    recorded = {"captures": 0, "replays": 0, "capturing": False}
    original_step = solver._CG._step

    def step(self):
        if recorded["capturing"]:
            recorded["graph"].work = self  # recorded, not run
            return
        original_step(self)

    class Graph:
        def replay(self):
            recorded["replays"] += 1
            original_step(self.work)

    @contextlib.contextmanager
    def capture(graph, stream=None):
        recorded["captures"] += 1
        recorded["capturing"], recorded["graph"] = True, graph
        yield
        recorded["capturing"] = False

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(solver._CG, "_step", step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 48, 48, generator=generator)
    keep = torch.rand(6, 48, 48, generator=generator) > torch.linspace(0.1, 0.9, 6).view(-1, 1, 1)
    keep[0] = False
    keep[0, 0, 0] = keep[0, -1, -1] = True  # near-singular: iterates after the others retired
    eager = solver._linear_imputation(images, keep)
    assert recorded["captures"] == recorded["replays"] == 0
    replayed = solver._linear_imputation(images, keep, cuda_graphs=True)
    assert torch.equal(replayed, eager)
    assert recorded["captures"] >= 2 and recorded["replays"] > recorded["captures"]
    # on CPU the public function ignores the option
    assert torch.equal(noisy_linear_imputation(images, keep, noise_std=0.0, cuda_graphs=True),
                       noisy_linear_imputation(images, keep, noise_std=0.0))


def test_chunks_are_balanced_and_sized_from_free_gpu_memory(monkeypatch):
    """A chunk's fixed cost is paid per chunk: 112 images under a budget of 111 are 2 x 56, not
    111 + 1. On a GPU the budget is a quarter of the free memory, within the bounds (private API)."""
    per_image = 3 * 224 * 224
    monkeypatch.setattr(imputation, "_CPU_CHUNK_VALUES", 111 * per_image)
    cpu = torch.device("cpu")
    assert imputation._chunk_size(112, per_image, cpu) == 56
    assert imputation._chunk_size(111, per_image, cpu) == 111
    assert imputation._chunk_size(223, per_image, cpu) == 75  # 3 chunks: 75 + 74 + 74
    monkeypatch.setattr(imputation, "_CPU_CHUNK_VALUES", 8 * per_image)
    assert imputation._chunk_size(14, per_image, cpu) == 7
    assert imputation._chunk_size(1, per_image, cpu) == 1
    assert imputation._chunk_size(5, 10 * per_image, cpu) == 1  # an image above the budget
    free = {"bytes": 0, "cached": 0}  # free on the device; held by PyTorch's allocator, unused
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 2 * free["bytes"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: free["cached"] + 1000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 1000)
    cuda = torch.device("cuda")
    low, high = imputation._GPU_CHUNK_VALUES
    free["bytes"] = 4 * imputation._BYTES_PER_VALUE * 2**25  # a budget of 2**25 values: 222 images
    assert imputation._chunk_size(896, per_image, cuda) == 180  # 5 chunks
    free["bytes"], free["cached"] = free["bytes"] // 2, free["bytes"] // 2  # half of it cached
    assert imputation._chunk_size(896, per_image, cuda) == 180
    free["cached"] = 0
    assert imputation._chunk_size(896, per_image, cuda) == 100  # 2**24 values: 111 images, 9 chunks
    free["bytes"] = 1000  # the lower bound: 27 images
    assert imputation._chunk_size(896, per_image, cuda) == -(-896 // -(-896 // (low // per_image)))
    free["bytes"] = 10**15  # the upper bound: 891 images
    assert imputation._chunk_size(896, per_image, cuda) == 448


def test_the_torsion_channel_certifies_kappa_and_leaves_at_the_torsion_check(monkeypatch):
    """kappa, the certified bound on ||A^-1 1||_inf, is an upper bound of the true value (dense
    solve) and a tight one (within 2.2x); the torsion channel leaves the batch at
    TORSION_CHECK, before the first full check, when every image has its kappa (private API)."""
    generator = torch.Generator().manual_seed(5)
    saliency = torch.nn.functional.interpolate(torch.rand(3, 1, 4, 4, generator=generator),
                                               size=(40, 40), mode="bilinear")[:, 0]
    removed = saliency > saliency.flatten(1).quantile(0.2, dim=1).view(-1, 1, 1)  # 80 %
    images = torch.rand(3, 3, 40, 40, generator=generator)
    seen = {}
    iterations = {"count": 0}
    original_advance, original_drop = imputation._CG._advance, imputation._CG._drop_torsion

    def advance(self):
        iterations["count"] += 1
        original_advance(self)

    def drop(self):
        seen.update(kappa=self.kappa.clone(), index=list(self.index), iteration=iterations["count"])
        original_drop(self)

    monkeypatch.setattr(imputation._CG, "_advance", advance)
    monkeypatch.setattr(imputation._CG, "_drop_torsion", drop)
    monkeypatch.setattr(imputation, "_CPU_CHUNK_VALUES", 10**9)  # one chunk
    imputed = noisy_linear_imputation(images, ~removed, noise_std=0.0)
    assert seen["iteration"] == imputation.TORSION_CHECK < imputation.CHECK_ITERATIONS[0]
    geometry = imputation._neighbour_sum(imputation._pad(torch.ones(1, 1, 40, 40)))
    work = imputation._Workspace(torch.device("cpu"))
    for row, image in enumerate(seen["index"]):
        ordered = removed.flatten(1).sum(dim=1).argsort()  # the solver's order: by removed count
        mask = removed[ordered[image]]
        level = imputation._FineLevel.build(mask[None], geometry)
        nodes = mask.flatten().numpy()
        operator = dense_operator(level, work)[np.ix_(nodes, nodes)]
        truth = np.linalg.solve(operator, np.ones(nodes.sum())).max()
        assert truth <= float(seen["kappa"][row]) <= 2.2 * truth, (truth, float(seen["kappa"][row]))
    assert_matches_reference(images, ~removed)
    assert torch.isfinite(imputed).all()
