"""ROAD's noisy linear imputation (Rong et al., 2022): exact, fast, batched, on the images' device.

Definition
----------
Every removed pixel equals the weighted mean of its 8 neighbours, with weight 1/6 for the 4 direct
neighbours and 1/12 for the 4 diagonal ones. Neighbours outside the image are dropped and the mean
is normalised by the sum of the weights of the neighbours inside the image. Neighbours may be kept
(known values) or removed (unknowns), so for every removed pixel ``i`` of an image and every channel

    d_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j,   d_i = sum_{j in image} w_ij,

a sparse linear system ``A x = b`` per image whose matrix ``A`` (one per image, shared by all
channels) is symmetric and, because every removed pixel's row is weakly diagonally dominant with
non-positive off-diagonal entries, a Stieltjes M-matrix: positive definite and with an entrywise
non-negative inverse as soon as every 8-connected component of removed pixels touches a kept pixel.
Gaussian noise ``N(0, noise_std**2)`` is then added to the imputed pixels only.

No kept neighbour at all
~~~~~~~~~~~~~~~~~~~~~~~~
A component of removed pixels with no kept neighbour is closed under 8-neighbourhood inside the
image, and the pixel grid is 8-connected, so it is the whole image: this happens exactly when
*every* pixel of an image is removed. The system is then singular (every constant image solves it,
with ``b = 0``); such images are filled with 0 -- the minimum-norm solution -- before the noise is
added.

Solver, and why
---------------
The reference implementation factorises a scipy sparse matrix per image on the CPU (0.03 to 0.5 s
per 224x224 imputation, growing with the removed fraction). Here the same system is solved, for a
whole batch of images at once, with dense ``(N, C, H, W)`` tensor operations that run unchanged on
CPU or GPU. Direct factorisations neither batch nor vectorise well, and plain (Jacobi
preconditioned) conjugate gradients need O(H) iterations: hundreds at 90% removal, where the removed
region spans the image. Hence:

* **Conjugate gradients** (the matrix is SPD), one independent CG per image and channel, with
* **a geometric multigrid V(1,1)-cycle as preconditioner**, which makes the iteration count
  independent of the image size and of the removed fraction (5 to 10 at 224x224, each dividing the
  error by about 10). The fine operator is the masked 3x3 stencil, applied with shifted views of
  zero-padded tensors (a separable [1,2,1] x [1,2,1] sum: 4 additions, much faster than ``conv2d``
  on CPU). The coarse operators are the Galerkin products ``P^T A P`` with bilinear interpolation
  ``P`` (masked to the removed pixels on the finest level), which stay 9-point stencils; they are
  assembled edge by edge (``x^T A x = sum_edges E (x_f - x_g)^2 + sum_f G_f x_f^2``) from strided
  views, so they are exact and symmetric for any mask: holes, isolated pixels, 1-pixel-wide images,
  image edges (the 121 edge terms of a level halved both ways are grouped by destination: one
  matrix product and 17 shifted adds). Grids are vertex-centred (n -> n // 2 + 1 nodes; a
  dimension of 1 or 2 is not coarsened). The smoother is Jacobi, damped only where needed for
  the preconditioner to stay SPD (``d_i = max(a_ii, sum_j |a_ij| / 2)``); undamped Jacobi
  already divides the high frequencies of this 9-point operator by 3 per sweep. The coarsest
  grid (at most 256 nodes) is solved with the inverse of its matrix, from a batched Cholesky
  factorisation (nodes that interpolate no removed pixel get a unit diagonal; a tiny ridge keeps
  the factorisation defined where the coarse interpolation is rank-deficient, a direction the
  prolongation maps to zero).
* **Mixed precision.** The preconditioner and the CG recurrences run in float32; the solution is
  accumulated in float64, and at every check the residual is recomputed in float64 (and
  substituted for the recursive float32 one where that one predicts convergence the float64 one
  does not confirm, has stalled, or has dropped 1e4-fold since the last substitution; the image's
  CG then restarts from it: iterative refinement).
  Float32 alone cannot reach the accuracy below: its attainable residual is about 1e-7, while the
  error bound needs residuals near 3e-8 at 90% removal.
* **Guaranteed accuracy, checked per image.** Because ``A^-1 >= 0`` entrywise,
  ``|x - x*| <= A^-1 |r| <= ||r||_inf ||A^-1 1||_inf``. A bound ``kappa >= ||A^-1 1||_inf`` is
  certified per image from an approximate solution ``z`` of ``A z = 1``, solved as one more CG
  channel during the first few iterations: ``A z >= m > 0`` on every removed pixel implies
  ``A^-1 1 <= z / m``. The channel is checked alone at :data:`TORSION_CHECK` (4) and leaves
  the batch as soon as every image has its bound (2 to 4 iterations are needed). An image
  leaves the batch at the first check where its float64 residual satisfies
  ``kappa ||r||_inf <= ATOL`` in every channel. ``ATOL`` = 5e-4 is half the
  1e-3 tolerance of comparisons with the reference and 8x below 8-bit quantisation (1/255); the
  actual error is usually far smaller (about 1e-6 on ROAD masks).
  :class:`ImputationNotConvergedError` is raised after ``MAX_ITERATIONS`` iterations.
* **Chunks, buffers, cropping.** The batch is solved a chunk of images at a time, grouped by
  removed fraction (so that they converge together), in chunks of equal size (a few images on
  CPU, where cache-sized chunks are fastest; on a GPU as many as a quarter of the free memory
  holds, since a chunk's fixed cost is a few thousand kernel launches), through reused buffers
  (on CPU, fresh multi-megabyte temporaries cost page faults comparable to the arithmetic); each
  chunk is cropped to the bounding box of its removed pixels (kept pixels outside only enter
  through ``b``).
* **Few host synchronisations.** Every per-image decision is a tensor operation on the images'
  device. The host reads one small tensor to plan the chunks (sizes and boxes of all images), and
  one per convergence check (which images are done, and when the next check is due): at the
  iteration where the residuals' observed rate predicts that every image still iterating meets
  the bound, and at the latest at :data:`CHECK_ITERATIONS` (spaced further apart as the iteration
  count grows). On a GPU the solve is a stream of kernels the host does not wait for, whatever
  the number of images; 5-8 reads for the 14 ROAD imputations of a 224 px image on CPU.

The 14 imputations of the ROAD protocol (7 percentages x MoRF/LeRF) are independent systems: stack
them along the batch dimension (repeat the image, one mask each). Devices: CPU or CUDA (the
certified residuals need float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ATOL", "MAX_ITERATIONS", "ImputationNotConvergedError", "available_memory", "noisy_linear_imputation",
]

ATOL = 5e-4
"""Guaranteed bound on the absolute error of each imputed value before noise (pixel-value units)."""
MAX_ITERATIONS = 100
"""Conjugate-gradient iterations after which :class:`ImputationNotConvergedError` is raised."""
DIRECT_WEIGHT = 1 / 6
DIAGONAL_WEIGHT = 1 / 12

CHECK_ITERATIONS = (6, 9, 12, 16, 22, 30, 40, 56, 80, 100)
"""The latest iterations at which convergence is checked (float64 residuals, one host read
each); a check comes earlier when the residuals' observed rate predicts that every image of the
chunk meets the bound sooner (:meth:`_CG._check`)."""
TORSION_CHECK = 4
"""The iteration at which the torsion channel is checked alone (:meth:`_CG._check_torsion`): by
then it certifies kappa for nearly every image (2 to 4 iterations are needed), and dropping it
there instead of at the first full check saves a quarter of the work of the iterations between."""

_COARSEST_NODES = 256  # the coarsest level has at most this many nodes (dense solve). 15x15 at
# 224 px: one level fewer than with 64 nodes, 167 operations per CG iteration instead of 204 (the
# GPU's kernel launches), 0.96-1.00x the time on CPU
_RIDGES = (1e-7, 1e-3)  # relative ridges of the coarsest matrix: the first that factorises is used
_REPLACE_FACTOR = 1e-4  # substitute the float64 residual once the recursive one dropped this much
_STALL_FACTOR = 0.5  # the recursive residual stalls when it fell by less than this between checks
_CPU_CHUNK_VALUES = 8 * 3 * 224 * 224  # values per chunk on CPU (measured best: 4 to 10 images)
_GPU_CHUNK_VALUES = (2**22, 2**27)  # values per chunk on a GPU: bounds of the memory-based size
_BYTES_PER_VALUE = 200  # peak memory of a chunk per image value (measured: 118 in its buffers and
# levels, plus its float64 solution and result; the call's own copies are counted by the caller)
_OFFSETS = [(di, dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]  # 3x3 stencil order, centre is 4


class ImputationNotConvergedError(RuntimeError):
    """The iterative solve did not reach :data:`ATOL` within :data:`MAX_ITERATIONS` iterations."""


def noisy_linear_imputation(
    images: Tensor,
    keep: Tensor,
    noise_std: float = 0.01,
    generator: torch.Generator | None = None,
    cuda_graphs: bool = False,
) -> Tensor:
    """Impute the removed pixels of each image by ROAD's noisy linear imputation.

    Every removed pixel becomes the weighted mean of its 8 neighbours (weights 1/6 direct, 1/12
    diagonal, normalised over the neighbours inside the image), kept or imputed themselves: the
    sparse linear system of Rong et al. (2022), solved to a guaranteed maximum absolute error of
    :data:`ATOL` (5e-4; typically 1e-6 on ROAD masks), plus the final rounding to the images'
    dtype.
    Gaussian noise of standard deviation ``noise_std`` is then added to the imputed pixels only
    (drawn for every pixel, so a seed gives the same noise field whatever the mask). An image
    whose pixels are all removed is filled with 0 (plus noise): the system is singular there and 0
    is its minimum-norm solution. See the module docstring for the solver (multigrid-preconditioned
    conjugate gradients, batched, on the images' device: CPU or CUDA).

    Args:
        images: (B, C, H, W) floating-point images, typically in [0, 1]; any finite values work.
        keep: (B, H, W) bool, False where the pixel is removed (to be imputed), on the same device.
        noise_std: standard deviation of the noise added to imputed pixels, in pixel-value units;
            0 returns the exact (noise-free) imputation.
        generator: ``torch.Generator`` on the images' device seeding the noise; the global RNG when
            None. Unused when ``noise_std`` is 0.
        cuda_graphs: on CUDA, replay each CG iteration between two checks from a captured CUDA
            graph (the iteration is hundreds of small kernels, launch-bound; see :class:`_CG`).
            Opt-in until measured on a GPU; the same kernels, so the same values. Ignored on CPU.

    Returns:
        (B, C, H, W) imputed images, same device and dtype as ``images``; kept pixels are bit-exact
        copies of the input. Half-precision inputs are solved in float32 and rounded at the end.

    Raises:
        ValueError: on malformed inputs (shapes, dtypes, devices, NaN or infinite values).
        ImputationNotConvergedError: if the solver does not converge (not observed in practice).
    """
    _validate(images, keep, noise_std, generator)
    if images.numel() == 0:
        return images.clone()
    imputed = _linear_imputation(images, keep, cuda_graphs and images.device.type == "cuda")
    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    imputed = imputed.to(work_dtype)
    if noise_std > 0:
        shape, device = images.shape, images.device
        noise = torch.randn(shape, generator=generator, device=device, dtype=work_dtype)
        imputed = imputed.add_(noise, alpha=noise_std)
    return torch.where(keep[:, None], images, imputed.to(images.dtype))


def _validate(
    images: Tensor, keep: Tensor, noise_std: float, generator: torch.Generator | None
) -> None:
    if not isinstance(images, Tensor) or not isinstance(keep, Tensor):
        raise ValueError("images and keep must be torch tensors")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images, got dtype {images.dtype}")
    if keep.dtype != torch.bool:
        raise ValueError(f"expected a bool keep mask (False = removed), got dtype {keep.dtype}")
    batch, _, height, width = images.shape
    if tuple(keep.shape) != (batch, height, width):
        raise ValueError(
            f"expected keep of shape (B, H, W) = {(batch, height, width)} to match images "
            f"{tuple(images.shape)}, got {tuple(keep.shape)}"
        )
    if keep.device != images.device:
        raise ValueError(f"keep is on {keep.device} but images are on {images.device}")
    if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    if generator is not None and (
        not isinstance(generator, torch.Generator) or generator.device.type != images.device.type
    ):
        raise ValueError(f"generator must be a torch.Generator on {images.device.type}")


# --------------------------------------------------------------------------------------------
# Exact solve: split the batch, crop, build the hierarchy, certify the error bound, iterate.
# --------------------------------------------------------------------------------------------


def _linear_imputation(images: Tensor, keep: Tensor, cuda_graphs: bool = False) -> Tensor:
    """(B, C, H, W) float64: kept pixels copied, removed pixels solved to within :data:`ATOL`
    (``cuda_graphs``: see :func:`noisy_linear_imputation`)."""
    batch, channels, height, width = images.shape
    removed = ~keep
    counts = removed.flatten(1).sum(dim=1)
    everything = counts == height * width  # singular: every pixel removed -> filled with 0
    values = images.to(torch.float64, copy=True).masked_fill_(everything.view(-1, 1, 1, 1), 0.0)
    # Plan on the host from one small read: order by removed fraction (similar images converge
    # together), bounding box of each image's removed pixels.
    order = counts.argsort()
    rows, cols = removed[order].any(dim=2), removed[order].any(dim=1)
    finite = torch.isfinite(images).flatten(1).all(dim=1)[order]
    plan = torch.stack([
        counts[order], rows.int().argmax(dim=1), height - 1 - rows.flip(1).int().argmax(dim=1),
        cols.int().argmax(dim=1), width - 1 - cols.flip(1).int().argmax(dim=1), finite.long(),
    ], dim=1).tolist()  # the plan's one host read
    if not all(row[5] for row in plan):
        raise ValueError("images contain NaN or infinite values")
    todo = [i for i, (count, *_) in enumerate(plan) if 0 < count < height * width]
    if not todo:
        return values
    chunk = _chunk_size(len(todo), channels * height * width, images.device)
    work = _Workspace(images.device)
    for start in range(todo[0], todo[-1] + 1, chunk):
        stop = min(start + chunk, todo[-1] + 1)
        box = (slice(min(plan[i][1] for i in range(start, stop)), max(plan[i][2] for i in range(start, stop)) + 1),
               slice(min(plan[i][3] for i in range(start, stop)), max(plan[i][4] for i in range(start, stop)) + 1))
        index = order[start:stop]
        # each chunk reads and writes only its own images' boxes: no full-image reordering copies
        solved = _solve_chunk(values, removed, index, box, work, cuda_graphs)
        values[(slice(None), slice(None), *box)].index_copy_(0, index, solved)
    return values


def available_memory(device: torch.device) -> int:
    """Bytes new tensors can take on a CUDA device: free on the device plus what PyTorch's caching
    allocator holds unused (host-side counters: no synchronisation)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _chunk_size(images: int, values_per_image: int, device: torch.device) -> int:
    """Images solved together: as many as the value budget allows, in chunks of equal size (112
    images under a budget of 111 are 2 x 56, not 111 + 1: a chunk's fixed cost, its hierarchy and
    a dozen iterations of launch-bound kernels on a GPU, is paid per chunk). The budget: on CPU
    :data:`_CPU_CHUNK_VALUES` (cache-sized chunks are fastest); on a GPU a quarter of its free
    memory (the device's, plus what PyTorch's allocator holds unused) at
    :data:`_BYTES_PER_VALUE`, within :data:`_GPU_CHUNK_VALUES` (bigger chunks launch the same
    kernels over more images)."""
    if device.type == "cuda":
        low, high = _GPU_CHUNK_VALUES
        budget = min(max(available_memory(device) // 4 // _BYTES_PER_VALUE, low), high)
    else:
        budget = _CPU_CHUNK_VALUES
    largest = max(1, budget // values_per_image)
    chunks = -(-images // largest)
    return -(-images // chunks)


def _solve_chunk(
    values: Tensor, removed: Tensor, index: Tensor, box: tuple[slice, slice], work: "_Workspace",
    cuda_graphs: bool = False,
) -> Tensor:
    """Solve the systems of images ``index`` (n,) of values (B, C, H, W) float64 and removed
    (B, H, W) bool, each with some pixels kept and every removed pixel inside ``box`` (rows,
    columns). Returns (n, C, h, w): the box of each image, removed pixels solved."""
    crop = (slice(None), slice(None), *box)
    crop_removed = removed[crop[1:]].index_select(0, index)
    ones = torch.ones((1, 1, *removed.shape[1:]), dtype=torch.float32, device=removed.device)
    geometry = _neighbour_sum(_pad(ones))[(..., *box)]  # 12 x (sum of in-image weights) + 4
    fine = _FineLevel.build(crop_removed, geometry)
    levels, inverse = _build_hierarchy(fine, work)
    solver = _CG(levels, inverse, values.shape[1], work, cuda_graphs)
    _right_hand_side(values, removed, index, box, solver.rhs[:, 1:], work)
    solution = solver.solve()
    return torch.where(crop_removed[:, None], solution, values[crop].index_select(0, index))


def _right_hand_side(values: Tensor, removed: Tensor, index: Tensor, box: tuple[slice, slice],
                     out: Tensor, work: "_Workspace") -> None:
    """Write b of images ``index`` on the box, the weighted sum of the kept neighbours' values,
    into the interior of out (n, C, h+2, w+2) float64. Only the box and its one-pixel ring are
    read (zero outside the image), into workspace buffers: full-image float64 temporaries cost
    more than the sum."""
    height, width = removed.shape[-2:]
    rows, cols = box
    top, bottom = max(rows.start - 1, 0), min(rows.stop + 1, height)
    left, right = max(cols.start - 1, 0), min(cols.stop + 1, width)
    pad_top, pad_bottom = 1 - (rows.start - top), 1 - (bottom - rows.stop)
    pad_left, pad_right = 1 - (cols.start - left), 1 - (right - cols.stop)
    shape = (index.shape[0], values.shape[1], rows.stop - rows.start + 2, cols.stop - cols.start + 2)
    known = work.get("rhs_known", shape, values.dtype)
    if pad_top or pad_bottom or pad_left or pad_right:
        known.zero_()
    inner = known[..., pad_top: shape[2] - pad_bottom, pad_left: shape[3] - pad_right]
    torch.index_select(values[..., top:bottom, left:right], 0, index, out=inner)
    inner.mul_(~removed[:, None, top:bottom, left:right].index_select(0, index))
    total = _neighbour_sum(known, work)
    box_removed = removed[(slice(None), *box)].index_select(0, index)[:, None]
    torch.mul(total, box_removed, out=out[..., 1:-1, 1:-1]).div_(12.0)


def _pad(tensor: Tensor) -> Tensor:
    """Zero halo of one pixel around the last two dimensions."""
    return torch.nn.functional.pad(tensor, (1, 1, 1, 1))


class _Workspace:
    """Named buffers reused across iterations and chunks (grown on demand, viewed at any shape).

    Allocating fresh multi-megabyte temporaries at every operation costs as much as the arithmetic
    on CPU: the allocator hands large blocks back to the OS, and every reuse page-faults.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}
        #: bumped whenever a buffer is (re)allocated: a captured CUDA graph holds the old addresses
        self.generation = 0

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get((name, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[(name, dtype)] = buffer
            self.generation += 1
        return buffer[:numel].view(shape)


def _neighbour_sum(padded: Tensor, work: _Workspace | None = None) -> Tensor:
    """(..., h, w) [1,2,1] x [1,2,1]-weighted 3x3 neighbourhood sums of a zero-padded input.

    The ROAD stencil is (this sum - 4 x centre) / 12: 1/6 direct, 1/12 diagonal, 0 at the centre.
    Four pairwise sums; with a workspace, the result is a view of one of its buffers.
    """
    *lead, height, width = padded.shape
    if work is None:
        pairs = padded[..., :-1] + padded[..., 1:]
        rows = pairs[..., :-1] + pairs[..., 1:]
        pairs = rows[..., :-1, :] + rows[..., 1:, :]
        return pairs[..., :-1, :] + pairs[..., 1:, :]
    first = work.get("sum_a", (*lead, height, width - 1), padded.dtype)
    torch.add(padded[..., :-1], padded[..., 1:], out=first)
    second = work.get("sum_b", (*lead, height, width - 2), padded.dtype)
    torch.add(first[..., :-1], first[..., 1:], out=second)
    first = work.get("sum_a", (*lead, height - 1, width - 2), padded.dtype)
    torch.add(second[..., :-1, :], second[..., 1:, :], out=first)
    second = work.get("sum_b", (*lead, height - 2, width - 2), padded.dtype)
    return torch.add(first[..., :-1, :], first[..., 1:, :], out=second)


# --------------------------------------------------------------------------------------------
# Multigrid hierarchy. All vectors are zero-padded (n, C, h + 2, w + 2) tensors.
# --------------------------------------------------------------------------------------------


class _Batched:
    """Dataclass mixin: select images (dim 0 of every tensor field)."""

    _shared: tuple[str, ...] = ()  # tensor fields common to all images (not selected)

    def row(self, index: int):
        """The level of one image, as views."""
        return self.select(slice(index, index + 1))

    def select(self, indices: Tensor | slice):
        names = [item.name for item in fields(self) if item.init and item.name not in self._shared]
        tensors = {name: getattr(self, name) for name in names}
        updates = {
            name: value[indices] for name, value in tensors.items() if isinstance(value, Tensor)
        }
        return replace(self, **updates)


@dataclass
class _FineLevel(_Batched):
    """The masked ROAD operator A e = mask / 12 * (geometry * e - neighbour_sum(e)).

    ``geometry`` = neighbour_sum of the all-ones image = 12 x (sum of in-image weights) + 4, so that
    12 (A e)_i = sum_j s_ij (e_i - e_j) over the in-image neighbours j (s = 2 direct, 1 diagonal).
    ``centre`` = mask * geometry / 12 is the diagonal plus 1/3. float32 tensors drive the
    preconditioner and CG; the float64 residuals use the exact small integers of mask and geometry.
    """

    mask: Tensor  # (n, 1, h+2, w+2) float32, 1 on removed pixels
    centre: Tensor
    mask12: Tensor
    dinv: Tensor  # inverse diagonal on removed pixels, 0 elsewhere
    geometry: Tensor  # (1, 1, h, w) float32, shared by all images

    _shared = ("geometry",)

    @staticmethod
    def build(removed: Tensor, geometry: Tensor) -> "_FineLevel":
        """removed (n, h, w) bool; geometry (1, 1, h, w) float32 (integers 1..16)."""
        mask = _pad(removed[:, None].float())
        padded = _pad(geometry)
        diagonal = (padded - 4.0) / 12.0
        inverse = torch.where(diagonal > 0, 1.0 / diagonal.clamp_min(1e-30), 0.0)
        return _FineLevel(
            mask=mask, centre=mask * (padded / 12.0), mask12=mask / 12.0, dinv=mask * inverse,
            geometry=geometry,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.mask.shape[-2] - 2, self.mask.shape[-1] - 2

    def apply(
        self, e: Tensor, out: Tensor, work: _Workspace, base: Tensor | None = None
    ) -> Tensor:
        """out = A e, or base - A e when base is given; e padded, zero off the removed pixels."""
        if base is None:
            torch.mul(self.centre, e, out=out)
        else:
            torch.addcmul(base, self.centre, e, value=-1.0, out=out)
        sign = -1.0 if base is None else 1.0
        mask12 = self.mask12[..., 1:-1, 1:-1]
        out[..., 1:-1, 1:-1].addcmul_(mask12, _neighbour_sum(e, work), value=sign)
        return out

    def residual64(self, x: Tensor, rhs: Tensor, out: Tensor, work: _Workspace) -> Tensor:
        """out = rhs - A x in float64 (x, rhs, out padded, x zero off the removed pixels)."""
        inner, mask = out[..., 1:-1, 1:-1], self.mask[..., 1:-1, 1:-1]
        difference = _neighbour_sum(x, work).addcmul_(self.geometry, x[..., 1:-1, 1:-1], value=-1.0)
        torch.addcmul(rhs[..., 1:-1, 1:-1], mask, difference, value=1.0 / 12.0, out=inner)
        out[..., 0, :], out[..., -1, :], out[..., :, 0], out[..., :, -1] = 0.0, 0.0, 0.0, 0.0
        return out


@dataclass(frozen=True)
class _Grid:
    """A coarse grid: its shape and whether it halves the height / width of the finer grid."""

    shape: tuple[int, int]
    halve_h: bool
    halve_w: bool


@dataclass
class _CoarseLevel(_Batched):
    """Galerkin coarse operator: a variable 9-point stencil per image.

    The stencil is stored on the flattened padded grid from node (1, 1) to node (h, w), with zeros
    in the halo columns in between, so that each of its 9 terms is one multiply-add of contiguous
    1-D slices.
    """

    stencil: Tensor  # (n, 9, 1, (h - 1) * (w + 2) + w) float32, offsets in _OFFSETS order
    dinv: Tensor  # (n, 1, h+2, w+2) float32, inverse Jacobi weights
    grid: _Grid
    planes: tuple[Tensor, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.planes = tuple(self.stencil.unbind(1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.grid.shape

    def grid_stencil(self) -> Tensor:
        """(n, 9, h, w) stencil on the coarse grid."""
        h, w = self.shape
        flat = torch.nn.functional.pad(self.stencil[:, :, 0], (1, 1))
        return flat.view(flat.shape[0], 9, h, w + 2)[..., 1 : w + 1]

    def apply(
        self, e: Tensor, out: Tensor, work: _Workspace, base: Tensor | None = None
    ) -> Tensor:
        """out = A e, or base - A e when base is given; e zero-padded."""
        width = self.shape[1] + 2
        first, length = width + 1, self.stencil.shape[-1]
        flat, target = e.flatten(2), out.flatten(2)
        if base is None:
            target.zero_()
        else:
            target.copy_(base.flatten(2))
        inner = target[..., first : first + length]
        sign = 1.0 if base is None else -1.0
        for plane, (di, dj) in zip(self.planes, _OFFSETS):
            start = first + di * width + dj
            inner.addcmul_(plane, flat[..., start : start + length], value=sign)
        return out


_Level = _FineLevel | _CoarseLevel


def _build_hierarchy(fine: _FineLevel, work: _Workspace) -> tuple[list[_Level], Tensor]:
    """Levels from fine to coarsest, and the (n, K, K) pseudo-inverse of the coarsest operator."""
    levels: list[_Level] = [fine]
    h, w = fine.shape
    while h * w > _COARSEST_NODES and (h > 2 or w > 2):
        grid = _Grid((h // 2 + 1 if h > 2 else h, w // 2 + 1 if w > 2 else w), h > 2, w > 2)
        levels.append(_galerkin(levels[-1], grid, work))
        h, w = grid.shape
    return levels, _coarsest_inverse(levels[-1], work)


_FORWARD = ((0, 1), (1, 0), (1, 1), (1, -1))  # one direction of each edge type of the 3x3 stencil


def _weight(dy: int, dx: int) -> float:
    return DIRECT_WEIGHT if 0 in (dy, dx) else DIAGONAL_WEIGHT


def _edge_form(level: _Level, work: _Workspace) -> Tensor:
    """(n, 5, h, w) planes: the 4 edge weights -a(f, f + t) for t in _FORWARD, then the row sums.

    Any symmetric 9-point operator is x^T A x = sum_edges E (x_f - x_g)^2 + sum_f G_f x_f^2.
    On the fine level E = w_t on edges between removed pixels and G = the weight of the kept
    neighbours (the row sums of the masked operator).
    """
    h, w = level.shape
    if isinstance(level, _CoarseLevel):
        stencil = level.grid_stencil()
        planes = [-stencil[:, _OFFSETS.index(t)] for t in _FORWARD] + [stencil.sum(dim=1)]
        return torch.stack(planes, dim=1)
    mask = level.mask[:, 0]
    inner = mask[:, 1:-1, 1:-1]
    planes = [
        inner * mask[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] * _weight(dy, dx)
        for dy, dx in _FORWARD
    ]
    kept_neighbours = level.geometry[:, 0] - _neighbour_sum(level.mask, work)[:, 0]
    return torch.stack(planes + [inner * kept_neighbours / 12.0], dim=1)


@functools.lru_cache(maxsize=None)
def _assembly_terms(halve_h: bool, halve_w: bool) -> tuple[tuple[int, ...], ...]:
    """Galerkin P^T A P of the edge form, as (source, uy, ux, cy, cx, offset, coefficient) terms,
    for the offsets 4.. of _OFFSETS (the centre and one of each pair of opposite neighbours).

    Fine node f = 2a + u (per halved dimension; f = a otherwise) interpolates from the coarse
    nodes a + c with weights P(f, a + c). An edge (f, f + t) of weight E adds E d(c1) d(c2) to the
    coarse entry (a + c1, a + c1 + offset), with d = P(f, .) - P(f + t, .) and offset = c2 - c1;
    the row sum G adds G P(f, a + c1) P(f, a + c2).
    """
    def support(phi: int, halve: bool) -> dict[int, float]:
        if not halve:
            return {phi: 1.0}
        return {phi // 2: 1.0} if phi % 2 == 0 else {(phi - 1) // 2: 0.5, (phi + 1) // 2: 0.5}

    def row(fy: int, fx: int) -> dict[tuple[int, int], float]:
        rows, cols = support(fy, halve_h).items(), support(fx, halve_w).items()
        return {(cy, cx): wy * wx for cy, wy in rows for cx, wx in cols}

    terms = []
    for uy in (0, 1) if halve_h else (0,):
        for ux in (0, 1) if halve_w else (0,):
            own = row(uy, ux)
            vectors = []
            for dy, dx in _FORWARD:
                other = row(uy + dy, ux + dx)
                nodes = own.keys() | other.keys()
                vectors.append({c: own.get(c, 0.0) - other.get(c, 0.0) for c in nodes})
            vectors.append(own)
            for source, vector in enumerate(vectors):
                entries = [(c, v) for c, v in vector.items() if v != 0.0]
                for (cy, cx), first in entries:
                    for (ey, ex), second in entries:
                        offset = _OFFSETS.index((ey - cy, ex - cx))
                        if offset >= 4:  # the other offsets follow by symmetry
                            terms.append((source, uy, ux, cy, cx, offset, first * second))
    return tuple(terms)


@functools.lru_cache(maxsize=None)
def _assembly_groups(
    halve_h: bool, halve_w: bool
) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[float, ...], ...]]:
    """:func:`_assembly_terms` grouped by destination: the (offset, cy, cx) of each group and
    its coefficients on the parity planes (source, uy, ux), flattened in that order: the coarse
    entries are then one matrix product and one shifted add per group (17 for a grid halved
    both ways) instead of one add per term (121)."""
    step_h, step_w = (2 if halve_h else 1), (2 if halve_w else 1)
    groups: dict[tuple[int, int, int], list[float]] = {}
    for source, uy, ux, cy, cx, offset, coefficient in _assembly_terms(halve_h, halve_w):
        row = groups.setdefault((offset, cy, cx), [0.0] * (5 * step_h * step_w))
        row[(source * step_h + uy) * step_w + ux] += coefficient
    return tuple(groups), tuple(tuple(row) for row in groups.values())


@functools.lru_cache(maxsize=None)
def _group_matrix(halve_h: bool, halve_w: bool, device: torch.device) -> Tensor:
    """(groups, parity planes) float32 coefficients on ``device``, made once per process."""
    matrix = torch.tensor(_assembly_groups(halve_h, halve_w)[1], dtype=torch.float32)
    return matrix.to(device, non_blocking=True)  # no stream synchronisation


def _galerkin(finer: _Level, grid: _Grid, work: _Workspace) -> _CoarseLevel:
    """The coarse operator P^T A P, assembled edge by edge from the finer operator's edge form.

    P is bilinear interpolation, masked to the removed pixels on the fine level (the fine edge
    form only has edges between removed pixels, which amounts to the same).
    """
    sources = _edge_form(finer, work)
    n, _, h, w = sources.shape
    hc, wc = grid.shape
    step_h, step_w = (2 if grid.halve_h else 1), (2 if grid.halve_w else 1)
    padded = sources.new_zeros((n, 5, step_h * hc, step_w * wc))
    padded[..., :h, :w] = sources
    # de-interleave the fine nodes by parity: rows (source, uy, ux), columns (image, coarse node)
    parts = padded.view(n, 5, hc, step_h, wc, step_w).permute(1, 3, 5, 0, 2, 4)
    parts = parts.reshape(5 * step_h * step_w, n * hc * wc)
    destinations, _ = _assembly_groups(grid.halve_h, grid.halve_w)
    combined = _group_matrix(grid.halve_h, grid.halve_w, sources.device) @ parts
    combined = combined.view(len(destinations), n, hc, wc)
    accumulator = sources.new_zeros((9, n, hc + 2, wc + 2))
    for (offset, cy, cx), values in zip(destinations, combined):
        accumulator[offset, :, 1 + cy : 1 + cy + hc, 1 + cx : 1 + cx + wc].add_(values)
    for offset, (dy, dx) in enumerate(_OFFSETS[:4]):  # A(c, c + d) = A(c + d, c)
        mirror = accumulator[8 - offset, :, 1 + dy : 1 + dy + hc, 1 + dx : 1 + dx + wc]
        accumulator[offset, :, 1:-1, 1:-1] = mirror
    stencil = accumulator[..., 1:-1, 1:-1].transpose(0, 1)
    weight = torch.maximum(stencil[:, 4], stencil.abs().sum(dim=1) / 2)  # SPD-safe Jacobi
    dinv = torch.where(weight > 0, 1.0 / weight.clamp_min(1e-30), 0.0)
    length = (hc - 1) * (wc + 2) + wc
    flat = torch.nn.functional.pad(stencil, (1, 1)).flatten(2)[:, :, None, 1 : 1 + length]
    return _CoarseLevel(flat.contiguous(), _pad(dinv[:, None]), grid)


def _coarsest_inverse(level: _Level, work: _Workspace) -> Tensor:
    """(n, K, K) float32 inverse of the coarsest operator (K = h w), from a float64 Cholesky
    factorisation. Nodes coupled to nothing (they interpolate no removed pixel) get a unit
    diagonal; a ridge (1e-7, or 1e-3 where that does not factorise, times the largest diagonal
    entry) keeps the matrix positive definite where the interpolation is rank-deficient (a null
    direction of the coarse matrix is one the prolongation maps to zero, so the inverse's value
    there never reaches the fine grid). It only preconditions: the CG certifies the accuracy.
    """
    h, w = level.shape
    n, nodes = level.dinv.shape[0], h * w
    basis = _pad(torch.eye(nodes, device=level.dinv.device).view(1, nodes, h, w))
    if isinstance(level, _FineLevel):  # the fine operator assumes e = 0 on kept pixels
        basis = basis * level.mask
    applied = level.apply(basis, basis.new_empty((n, nodes, h + 2, w + 2)), work)
    matrix = applied[..., 1:-1, 1:-1].reshape(n, nodes, nodes).double()
    matrix = (matrix + matrix.transpose(1, 2)) / 2
    diagonal = matrix.diagonal(dim1=1, dim2=2)
    scale = diagonal.amax(dim=1, keepdim=True).clamp_min(1e-300)
    factors = []
    for ridge in _RIDGES:  # no host read: each image takes the first factorisation that worked
        shift = torch.where(diagonal > 0, ridge * scale, 1.0)
        factor, info = torch.linalg.cholesky_ex(matrix + torch.diag_embed(shift))
        factors.append((factor, info))
    factor = torch.where((factors[0][1] == 0).view(-1, 1, 1), factors[0][0], factors[1][0])
    identity = torch.eye(nodes, dtype=factor.dtype, device=factor.device).expand_as(factor)
    lower_inverse = torch.linalg.solve_triangular(factor, identity, upper=False)  # no error check
    return (lower_inverse.transpose(1, 2) @ lower_inverse).float()


# --------------------------------------------------------------------------------------------
# Grid transfers (bilinear interpolation P and its transpose), V-cycle.
# Each acts along dim -2 of zero-padded tensors; dim -1 goes through transposed views.
# --------------------------------------------------------------------------------------------


def _restrict_rows(fine: Tensor, out: Tensor) -> None:
    """out = P^T fine along dim -2: coarse row c collects fine row 2c and half of rows 2c +- 1.

    fine (..., n + 2, X) and out (..., n // 2 + 3, X) are zero-padded along dim -2 (halo written).
    """
    size, coarse = fine.shape[-2] - 2, out.shape[-2] - 2
    full = coarse if size % 2 else coarse - 1  # coarse rows with 3 fine rows in the padded range
    evens = fine[..., 0 : 2 * full + 1 : 2, :]
    target = out[..., 1 : full + 1, :]
    torch.add(fine[..., 1 : 2 * full : 2, :], evens[..., :-1, :], alpha=0.5, out=target)
    target.add_(evens[..., 1:, :], alpha=0.5)
    if full < coarse:  # even size: the last coarse row sits just outside, on the halo
        torch.mul(fine[..., size, :], 0.5, out=out[..., coarse, :])
    out[..., 0, :] = 0.0
    out[..., coarse + 1, :] = 0.0


def _interpolate_rows(coarse: Tensor, out: Tensor) -> None:
    """out = P coarse along dim -2: fine row 2c is coarse row c, fine row 2c + 1 their mean.

    coarse (..., nc + 2, X) and out (..., n + 2, X) are zero-padded along dim -2 (halo written).
    """
    size = out.shape[-2] - 2
    evens, odds = (size + 1) // 2, size // 2
    out[..., 1 : size + 1 : 2, :] = coarse[..., 1 : evens + 1, :]
    below, above = coarse[..., 1 : odds + 1, :], coarse[..., 2 : odds + 2, :]
    torch.lerp(below, above, 0.5, out=out[..., 2 : size + 1 : 2, :])
    out[..., 0, :] = 0.0
    out[..., size + 1, :] = 0.0


def _interpolate_rows_add(coarse: Tensor, fine: Tensor, mask: Tensor | None) -> None:
    """fine += (mask *) P coarse along dim -2, on the interior rows of the padded fine tensor."""
    size = fine.shape[-2] - 2
    evens, odds = (size + 1) // 2, size // 2
    even_rows, odd_rows = fine[..., 1 : size + 1 : 2, :], fine[..., 2 : size + 1 : 2, :]
    below, above = coarse[..., 1 : odds + 1, :], coarse[..., 2 : odds + 2, :]
    if mask is None:
        even_rows.add_(coarse[..., 1 : evens + 1, :])
        odd_rows.add_(below, alpha=0.5).add_(above, alpha=0.5)
    else:
        odd_mask = mask[..., 2 : size + 1 : 2, :]
        even_rows.addcmul_(mask[..., 1 : size + 1 : 2, :], coarse[..., 1 : evens + 1, :])
        odd_rows.addcmul_(odd_mask, below, value=0.5).addcmul_(odd_mask, above, value=0.5)


def _restrict(fine: Tensor, grid: _Grid, out: Tensor, transfer: Tensor) -> Tensor:
    """out (n, C, hc+2, wc+2) = P^T fine (n, C, h+2, w+2); transfer: (n, C, hc+2, w+2) scratch."""
    rows = fine
    if grid.halve_h:
        rows = transfer
        _restrict_rows(fine, rows)
    if grid.halve_w:
        _restrict_rows(rows.transpose(-1, -2), out.transpose(-1, -2))
    else:
        out.copy_(rows)
    return out


def _prolong_add(
    fine: Tensor, coarse_values: Tensor, grid: _Grid, mask: Tensor | None, transfer: Tensor
) -> None:
    """fine += (mask *) P coarse_values, in place; transfer: (n, C, hc+2, w+2) scratch."""
    columns = coarse_values
    if grid.halve_w:
        columns = transfer
        _interpolate_rows(coarse_values.transpose(-1, -2), columns.transpose(-1, -2))
    if grid.halve_h:
        _interpolate_rows_add(columns, fine, mask)
    elif mask is None:
        fine.add_(columns)
    else:
        fine.addcmul_(mask, columns)


def _vcycle(
    levels: list[_Level],
    pinv: Tensor,
    residual: Tensor,
    out: Tensor,
    work: _Workspace,
    depth: int = 0,
) -> Tensor:
    """out = one symmetric V(1,1)-cycle (Jacobi smoothing) applied to a padded residual: ~A^-1 r."""
    level = levels[depth]
    if depth == len(levels) - 1:
        return _dense_solve(pinv, residual, out)
    n, channels, _, width = residual.shape
    coarse = levels[depth + 1]
    h, w = coarse.shape
    temp = work.get(f"residual{depth}" if depth else "scratch", residual.shape)
    transfer = work.get(f"transfer{depth}", (n, channels, h + 2, width))
    coarse_residual = work.get(f"rhs{depth + 1}", (n, channels, h + 2, w + 2))
    coarse_correction = work.get(f"z{depth + 1}", (n, channels, h + 2, w + 2))
    torch.mul(level.dinv, residual, out=out)
    _restrict(level.apply(out, temp, work, base=residual), coarse.grid, coarse_residual, transfer)
    _vcycle(levels, pinv, coarse_residual, coarse_correction, work, depth + 1)
    mask = level.mask if depth == 0 else None
    _prolong_add(out, coarse_correction, coarse.grid, mask, transfer)
    return out.addcmul_(level.dinv, level.apply(out, temp, work, base=residual))


def _dense_solve(pinv: Tensor, residual: Tensor, out: Tensor) -> Tensor:
    """out = pinv r on the coarsest grid (padded (n, C, h+2, w+2) tensors)."""
    n, channels, h, w = residual.shape[0], residual.shape[1], *out[0, 0, 1:-1, 1:-1].shape
    flat = residual[..., 1:-1, 1:-1].reshape(n, channels, h * w)
    out.zero_()
    out[..., 1:-1, 1:-1] = (flat @ pinv).view(n, channels, h, w)
    return out


# --------------------------------------------------------------------------------------------
# Error bound and conjugate gradients.
# --------------------------------------------------------------------------------------------


def _dot(a: Tensor, b: Tensor, work: _Workspace) -> Tensor:
    """(n, C) inner products of padded tensors (n, C, h+2, w+2)."""
    return torch.mul(a, b, out=work.get("scratch", a.shape)).sum(dim=(2, 3))


def _max_abs(tensor: Tensor, work: _Workspace | None = None) -> Tensor:
    """(n,) max |value| per image."""
    if work is None:
        return tensor.abs().amax(dim=(1, 2, 3))
    magnitude = torch.abs(tensor, out=work.get("scratch", tensor.shape, tensor.dtype))
    return magnitude.amax(dim=(1, 2, 3))


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """(n, C, 1, 1) numerator / denominator, 0 where the denominator is not positive."""
    ratio = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-38), 0.0)
    return ratio[..., None, None]


class _CG:
    """Multigrid-preconditioned CG on a chunk: float32 recurrences, float64 solution and checks.

    Channel 0 (an extra one) solves the torsion problem A z = 1 until it certifies the error
    amplification bound kappa >= ||A^-1 1||_inf for every image (:meth:`_check_torsion` at
    :data:`TORSION_CHECK`, else :meth:`_check`); it is then dropped, the state becoming views
    of channels 1.. of the same buffers. At each check (when the residuals' rate predicts
    convergence, at the latest at :data:`CHECK_ITERATIONS`) the host reads one small tensor:
    which images meet the bound and when the next check is due. Those are written to the
    solution and leave the batch (the state is compacted, the hierarchy with it), so the work
    follows the images still iterating.
    """

    _STATE = ("rhs", "x", "delta", "residual", "direction")

    def __init__(self, levels: list[_Level], inverse: Tensor, channels: int, work: _Workspace,
                 cuda_graphs: bool = False):
        """Fill ``rhs[:, 1:]`` (padded, float64, zero) with b, then call :meth:`solve`.
        ``cuda_graphs``: replay :meth:`_step` from a captured CUDA graph (:meth:`_advance`)."""
        self.levels, self.inverse, self.work = levels, inverse, work
        self.cuda_graphs = cuda_graphs
        self.version = 0  # bumped when the state's tensors change (retired rows, torsion dropped)
        self._graph: Any = None
        self._graph_key: tuple[int, int] | None = None
        mask = levels[0].mask
        n, shape = mask.shape[0], (mask.shape[0], channels + 1, *mask.shape[2:])
        self.index = list(range(n))  # row -> image of the chunk
        self.rhs = work.get("rhs", shape, torch.float64).zero_()
        self.rhs[:, :1] = mask
        self.x = work.get("x", shape, torch.float64).zero_()
        self.delta = work.get("delta", shape).zero_()  # float32 increments since last check
        self.residual = work.get("residual", shape)
        self.direction = work.get("direction", shape).zero_()
        # r.z of the previous iteration; inf restarts CG (beta = 0): the first step, refreshes
        self.rz = torch.full(shape[:2], math.inf, dtype=torch.float32, device=mask.device)
        self.torsion = True
        self.kappa = torch.full((n,), math.inf, dtype=torch.float64, device=mask.device)
        self.checked = torch.full_like(self.kappa, math.inf)  # float64 max-norm residual
        self.solution = torch.zeros_like(self.rhs[:, 1:])

    @property
    def main(self) -> slice:
        """The channels of the images (all but the torsion channel)."""
        return slice(1, None) if self.torsion else slice(None)

    def solve(self) -> Tensor:
        """(n, C, h, w) float64 x with ||x - x*||_inf <= ATOL."""
        self.residual.copy_(self.rhs)
        self.checked = _max_abs(self.rhs[:, 1:])
        self.reference = self.last_recursive = self.checked
        due, previous = CHECK_ITERATIONS[0], 0
        for iteration in range(1, MAX_ITERATIONS + 1):
            self._advance()
            if self.torsion and iteration == TORSION_CHECK < due:
                due = min(iteration + self._check_torsion(iteration), due)
                continue
            if iteration == due or iteration == MAX_ITERATIONS:
                done, needed = self._check(iteration - previous)
                if done:
                    return self.solution[..., 1:-1, 1:-1]
                scheduled = next((i for i in CHECK_ITERATIONS if i > iteration), MAX_ITERATIONS)
                due, previous = min(scheduled, iteration + needed), iteration
        worst = float((self.checked * self.kappa).max())
        raise ImputationNotConvergedError(
            f"noisy linear imputation did not converge in {MAX_ITERATIONS} iterations for "
            f"{len(self.index)} image(s); error bound {worst:.3g} > {ATOL:g}"
        )

    def _advance(self) -> None:
        """One PCG iteration: :meth:`_step`, or with ``cuda_graphs`` a replay of it. A graph is
        captured (after one eager warm-up step on the capture stream) for the state's current
        tensors, and again whenever they change: rows retired, the torsion channel dropped, or a
        workspace buffer reallocated. Every tensor the step writes is a persistent buffer, so the
        replay is the step."""
        if not self.cuda_graphs:
            self._step()
            return
        key = (self.version, self.work.generation)
        if self._graph is not None and self._graph_key == key:
            self._graph.replay()
            return
        self._graph = None  # release the old graph's memory pool before capturing anew
        stream = torch.cuda.Stream(device=self.rz.device)
        stream.wait_stream(torch.cuda.current_stream(self.rz.device))
        with torch.cuda.stream(stream):
            self._step()  # this iteration, eagerly: warms up the libraries on the capture stream
        torch.cuda.current_stream(self.rz.device).wait_stream(stream)
        if (self.version, self.work.generation) != key:  # the warm-up grew a buffer: capture next time
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._step()  # recorded, not run
        self._graph, self._graph_key = graph, key

    def _step(self) -> None:
        """One PCG iteration (into persistent buffers only: capturable as a CUDA graph)."""
        shape, work = self.residual.shape, self.work
        z = _vcycle(self.levels, self.inverse, self.residual, work.get("z", shape), work)
        rz = _dot(self.residual, z, work)
        torch.addcmul(z, self.direction, _ratio(rz, self.rz), out=self.direction)
        self.rz.copy_(rz)
        product = self.levels[0].apply(self.direction, z, work)
        alpha = _ratio(rz, _dot(self.direction, product, work))
        self.delta.addcmul_(self.direction, alpha)
        self.residual.addcmul_(product, alpha, value=-1.0)

    def _check(self, elapsed: int) -> tuple[bool, int]:
        """Certify kappa from the torsion channel and compute every image's float64 residual;
        retire the images within the bound ``max|r| * kappa <= ATOL``. Where the recursive float32
        residual predicts convergence that the float64 one does not confirm, has dropped by
        :data:`_REPLACE_FACTOR` since the last substitution, or has stalled (float32's precision
        floor, reached on near-singular systems), substitute the float64 residual for it and
        restart that image's CG from it (iterative refinement). One host read. Returns (whether
        every image is done, the iterations after which every image still iterating is predicted
        to be within the bound at its residual's rate over the last ``elapsed`` iterations; at
        least 1, MAX_ITERATIONS when unknown)."""
        self.x.add_(self.delta)
        self.delta.zero_()
        exact = self.levels[0].residual64(
            self.x, self.rhs, self.work.get("residual64", self.x.shape, torch.float64), self.work)
        if self.torsion:
            self._certify(self.x[:, :1], exact[:, :1])
        recursive = _max_abs(self.residual[:, self.main], self.work).double()
        self.checked = _max_abs(exact[:, self.main], self.work)
        done = (self.checked == 0) | (self.checked * self.kappa <= ATOL)
        needed = self._iterations_needed(recursive, done, elapsed)
        stalled = recursive > _STALL_FACTOR * self.last_recursive  # float32 at its precision floor
        predicted = recursive * self.kappa <= 0.9 * ATOL
        refresh = stalled | predicted | (recursive <= _REPLACE_FACTOR * self.reference)
        exact32 = self.work.get("exact32", exact.shape).copy_(exact)
        torch.where(refresh.view(-1, 1, 1, 1), exact32, self.residual, out=self.residual)
        # beta = 0 on the next step: a fresh CG from the substituted residual
        self.rz.masked_fill_(refresh.view(-1, 1), math.inf)
        self.reference = torch.where(refresh, self.checked, self.reference)
        self.last_recursive = torch.where(refresh, self.checked, recursive)
        certified = torch.isfinite(self.kappa).all().view(1)
        read = torch.cat([certified.double(), needed.view(1), done.double()]).tolist()  # the one read
        all_certified, needed, finished = read[0], int(read[1]), [bool(v) for v in read[2:]]
        if all(finished):
            self.solution[self.index] = self.x[:, self.main]
            return True, 0
        if self.torsion and all_certified:
            self._drop_torsion()
        if any(finished):
            self._retire(finished)
        return False, max(needed, 1)

    def _certify(self, torsion: Tensor, residual: Tensor) -> None:
        """Set kappa where it is not yet known and the torsion solution certifies it: with
        r = 1 - A z (float64, 0 off the removed pixels), A z >= m = 1 - max r > 0 bounds
        A^-1 1 <= z / m (A^-1 >= 0 entrywise); certified when m > 1/2.
        torsion, residual: (n, 1, h+2, w+2) float64."""
        lowest = 1.0 - residual.amax(dim=(1, 2, 3))
        peak = torsion.amax(dim=(1, 2, 3))
        certified = torch.isinf(self.kappa) & (lowest > 0.5)
        self.kappa = torch.where(certified, peak / lowest.clamp_min(0.5), self.kappa)

    def _drop_torsion(self) -> None:
        """The state becomes views of channels 1.. (the images' channels)."""
        for name in self._STATE:
            setattr(self, name, getattr(self, name)[:, 1:])
        self.rz = self.rz[:, 1:]
        self.torsion = False
        self.version += 1

    def _check_torsion(self, elapsed: int) -> int:
        """The torsion channel alone, at :data:`TORSION_CHECK`: certify kappa from its float64
        residual and drop the channel once every image has kappa; predict from the images'
        recursive residuals (their rate since the start, kappa) when they meet the bound. One
        host read. Returns the predicted iterations from now (at least 1)."""
        shape = (self.x.shape[0], 1, *self.x.shape[2:])
        torsion = torch.add(self.x[:, :1], self.delta[:, :1],
                            out=self.work.get("torsion64", shape, torch.float64))
        residual = self.levels[0].residual64(
            torsion, self.rhs[:, :1], self.work.get("residual64", shape, torch.float64), self.work)
        self._certify(torsion, residual)
        recursive = _max_abs(self.residual[:, 1:], self.work).double()
        undecided = torch.zeros_like(recursive, dtype=torch.bool)
        needed = self._iterations_needed(recursive, undecided, elapsed)
        certified = torch.isfinite(self.kappa).all().double().view(1)
        all_certified, needed = torch.cat([certified, needed.view(1)]).tolist()  # the one read
        if all_certified:
            self._drop_torsion()
        return max(int(needed), 1)

    def _iterations_needed(self, recursive: Tensor, done: Tensor, elapsed: int) -> Tensor:
        """() float64: iterations until the slowest image not ``done`` has its bound
        ``recursive * kappa`` at 0.9 * ATOL, extrapolating the geometric rate since the last
        check (``last_recursive``, ``elapsed`` iterations ago); 1 when every image is there,
        MAX_ITERATIONS when a rate or kappa is not known yet. Computed on the device and read
        with the check's flags."""
        bound = recursive * self.kappa
        rate = (recursive / self.last_recursive.clamp_min(1e-300)).clamp(1e-12, 0.95) ** (1.0 / max(elapsed, 1))
        needed = (torch.log((0.9 * ATOL) / bound.clamp_min(1e-300)) / torch.log(rate)).ceil()
        needed = torch.where(done | (bound <= 0.9 * ATOL), 1.0, needed)
        needed = torch.where(torch.isfinite(needed), needed, float(MAX_ITERATIONS))
        return needed.amax().clamp(1, MAX_ITERATIONS)

    def _retire(self, finished: list[bool]) -> None:
        """Write the finished rows' solutions; compact the state, the hierarchy and the
        per-image values to the rows still iterating."""
        rows = [row for row, stop in enumerate(finished) if stop]
        keep = [row for row, stop in enumerate(finished) if not stop]
        self.solution[[self.index[row] for row in rows]] = self.x[rows][:, self.main]
        self.index = [self.index[row] for row in keep]
        device_keep = torch.tensor(keep, device=self.kappa.device)
        self.kappa, self.checked = self.kappa[device_keep], self.checked[device_keep]
        self.last_recursive = self.last_recursive[device_keep]
        self.reference = self.reference[device_keep]
        self.levels = [level.select(device_keep) for level in self.levels]
        self.inverse = self.inverse[device_keep]
        self.rz = self.rz[device_keep]
        self.version += 1
        for name in self._STATE:  # rows keep[i] -> i, in place (keep is increasing: no overlap issue)
            state = getattr(self, name)
            state[: len(keep)] = state[device_keep]
            setattr(self, name, state[: len(keep)])
