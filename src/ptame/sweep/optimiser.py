"""Proposals of the sweep, with BoTorch directly.

- Initial trials: a scrambled Sobol sequence over the unit cube (``torch.quasirandom``, seeded);
  points that violate a constraint are rejected, so initial trial i is the i-th feasible Sobol
  point (the same on every resume).
- Then a Gaussian process on every finished trial (failed ones with their worst values):
  ``SingleTaskGP``, or ``MixedSingleTaskGP`` (categorical kernel on the choice dimensions) when
  the space has choices; outcomes standardised. Acquisition: ``qLogNoisyExpectedImprovement`` on
  one maximised objective, or ``qLogNoisyExpectedHypervolumeImprovement`` on several (each
  oriented for maximisation), optimised over q points at once with the space's linear
  constraints (``optimize_acqf``; ``optimize_acqf_mixed`` enumerating the choice combinations, or
  ``optimize_acqf_mixed_alternating`` when there are too many).
- Every proposal is checked against the constraints; the optimiser's last-digit violations
  (SLSQP stops within its tolerance) are removed by moving the point towards a strictly feasible
  interior point, which stays inside because the feasible set is convex.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ptame.sweep.space import SearchSpace, SpaceError

log = logging.getLogger(__name__)

DTYPE = torch.float64
# Sobol points drawn at most while looking for feasible ones
MAX_SOBOL_DRAWS = 2**20


def sobol_points(space: SearchSpace, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The first ``count`` feasible points of the seeded scrambled Sobol sequence.

    Raises:
        SpaceError: when the constraints leave (almost) nothing feasible.
    """
    from torch.quasirandom import SobolEngine

    engine = SobolEngine(space.dim, scramble=True, seed=int(seed))
    points: list[dict[str, Any]] = []
    drawn = 0
    while len(points) < count:
        if drawn >= MAX_SOBOL_DRAWS:
            raise SpaceError(
                f"only {len(points)} of {drawn} Sobol points satisfy the constraints "
                f"{[c.text for c in space.constraints]}: the feasible region is empty or tiny"
            )
        block = engine.draw(min(1024, MAX_SOBOL_DRAWS - drawn), dtype=DTYPE)
        drawn += block.shape[0]
        for row in block.tolist():
            params = space.decode(space.from_unit(row))
            if space.is_feasible(params):
                points.append(params)
                if len(points) == count:
                    break
    return points


def interior_point(space: SearchSpace, seed: int = 0) -> list[float]:
    """Encoded coordinates of a strictly feasible point: the mean of 64 feasible Sobol points
    on the constrained (linear float) dimensions (a convex combination stays feasible, and an
    average of spread points lies inside)."""
    points = sobol_points(space, 64, seed=seed + 1)
    encoded = torch.tensor([space.encode(p) for p in points], dtype=DTYPE)
    return encoded.mean(dim=0).tolist()


def repair(
    space: SearchSpace, coordinates: Sequence[float], centre: Sequence[float]
) -> dict[str, Any]:
    """Decode ``coordinates``; if a constraint is violated (optimiser tolerance), move the
    constrained dimensions towards ``centre`` just enough to satisfy all of them.

    Raises:
        SpaceError: if no feasible point results (a bug, or an inconsistent centre).
    """
    params = space.decode(coordinates)
    if space.is_feasible(params):
        return params
    constrained = sorted({i for indices, _, _ in space.encoded_constraints() for i in indices})
    point = list(coordinates)
    # a on the encoded coordinates: g(u) = sum(c * u) - rhs >= 0 must hold; shrink u -> centre
    step = 1.0
    for indices, coefficients, rhs in space.encoded_constraints():
        g_point = sum(c * point[i] for i, c in zip(indices, coefficients)) - rhs
        g_centre = sum(c * centre[i] for i, c in zip(indices, coefficients)) - rhs
        if g_point < 0 < g_centre:
            step = min(step, g_centre / (g_centre - g_point))
    for shrink in (1 - 1e-9, 1 - 1e-6, 1 - 1e-3, 0.9, 0.5, 0.0):
        candidate = list(point)
        for i in constrained:
            candidate[i] = centre[i] + step * shrink * (point[i] - centre[i])
        params = space.decode(candidate)
        if space.is_feasible(params):
            return params
    raise SpaceError(
        f"could not repair the proposal {space.decode(coordinates)}: {space.violations(space.decode(coordinates))}"
    )


def _fit_model(space: SearchSpace, train_x: Tensor, train_y: Tensor) -> Any:
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import MixedSingleTaskGP, SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    outcome = Standardize(m=train_y.shape[-1])
    if space.cat_dims:
        model = MixedSingleTaskGP(
            train_x, train_y, cat_dims=space.cat_dims, outcome_transform=outcome
        )
    else:
        model = SingleTaskGP(train_x, train_y, outcome_transform=outcome)
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        # few, noisy points: the fit may warn about convergence; the model is still usable
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(mll)
    return model


def _acquisition(
    model: Any, train_x: Tensor, train_y: Tensor, reference_point: Sequence[float] | None
) -> Any:
    if train_y.shape[-1] == 1:
        from botorch.acquisition.logei import qLogNoisyExpectedImprovement

        return qLogNoisyExpectedImprovement(model, X_baseline=train_x, prune_baseline=True)
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.utils.multi_objective.hypervolume import infer_reference_point
    from botorch.utils.multi_objective.pareto import is_non_dominated

    if reference_point is None:
        ref = infer_reference_point(train_y[is_non_dominated(train_y)])
    else:
        ref = torch.as_tensor(list(reference_point), dtype=DTYPE)
    return qLogNoisyExpectedHypervolumeImprovement(
        model, ref_point=ref.tolist(), X_baseline=train_x, prune_baseline=True
    )


def _feasible_raw(
    space: SearchSpace, count: int, fixed: Mapping[int, float], generator: torch.Generator
) -> Tensor:
    """``count`` random feasible encoded points (count, 1, d) with the ``fixed`` choice
    dimensions set: starting points for the acquisition optimiser (rejection sampling is far
    cheaper here than BoTorch's hit-and-run polytope sampler)."""
    rows: list[list[float]] = []
    for _ in range(10_000):
        block = torch.rand(max(count, 256), space.dim, dtype=DTYPE, generator=generator).tolist()
        for unit in block:
            coordinates = space.from_unit(unit)
            for dim, value in fixed.items():
                coordinates[dim] = value
            if space.is_feasible(space.decode(coordinates)):
                rows.append(coordinates)
        if len(rows) >= count:
            return torch.tensor(rows[:count], dtype=DTYPE).unsqueeze(1)
    raise SpaceError(
        f"the constraints {[c.text for c in space.constraints]} leave (almost) no feasible point"
    )


def _best_point(
    acquisition: Any,
    space: SearchSpace,
    bounds: Tensor,
    constraints: list | None,
    fixed: Mapping[int, float],
    num_restarts: int,
    raw_samples: int,
    generator: torch.Generator,
) -> tuple[Tensor, float]:
    """One point maximising ``acquisition`` with the ``fixed`` dimensions held: the best of
    ``num_restarts`` constrained local optimisations (SLSQP when constrained, else L-BFGS-B)
    started from the best of ``raw_samples`` random feasible points."""
    from botorch.optim import optimize_acqf
    from botorch.optim.initializers import initialize_q_batch

    raw = _feasible_raw(space, raw_samples, fixed, generator)
    with torch.no_grad():
        values = torch.cat([acquisition(chunk) for chunk in raw.split(256)])
    starts, _ = initialize_q_batch(raw, values, n=min(num_restarts, raw.shape[0]))
    candidate, value = optimize_acqf(
        acquisition,
        bounds,
        q=1,
        num_restarts=starts.shape[0],
        batch_initial_conditions=starts,
        inequality_constraints=constraints,
        fixed_features=dict(fixed) or None,
        options={"maxiter": 100},
    )
    return candidate.detach().reshape(1, -1), float(value)


def propose(
    space: SearchSpace,
    observed: Sequence[Mapping[str, Any]],
    values: Sequence[Sequence[float]],
    q: int,
    seed: int = 0,
    reference_point: Sequence[float] | None = None,
    num_restarts: int = 10,
    raw_samples: int = 512,
    max_enumerated: int = 64,
) -> list[dict[str, Any]]:
    """``q`` new points by Bayesian optimisation.

    The q points are chosen sequentially (greedy): each maximises the acquisition function
    given the points already chosen as pending (``set_X_pending``), which is BoTorch's
    sequential q-batch optimisation; choice dimensions are enumerated exactly (every
    combination optimised, the best kept) up to ``max_enumerated`` combinations, beyond that
    ``optimize_acqf_mixed_alternating`` takes over.

    Args:
        space: the search space.
        observed: parameters of the finished trials (derived entries are ignored).
        values: per trial, the objective values oriented for maximisation (n, m); m = 1: log
            noisy EI; m > 1: log noisy EHVI.
        q: batch size.
        seed: seed of the MC samples and random starting points (reproducible proposals).
        reference_point: hypervolume reference (oriented like ``values``); None: inferred from
            the observed Pareto front.
        num_restarts, raw_samples: acquisition optimisation effort.
        max_enumerated: choice combinations enumerated exactly at most.

    Returns:
        ``q`` feasible parameter dicts (no derived values).
    """
    if len(observed) != len(values) or not observed:
        raise ValueError(
            f"need one value row per observed trial (got {len(observed)} trials, {len(values)} rows)"
        )
    threads = torch.get_num_threads()
    # tiny matrices: one thread is faster than several contending ones
    torch.set_num_threads(1)
    try:
        torch.manual_seed(int(seed))
        generator = torch.Generator().manual_seed(int(seed))
        train_x = torch.tensor([space.encode(p) for p in observed], dtype=DTYPE)
        train_y = torch.tensor([list(v) for v in values], dtype=DTYPE)
        model = _fit_model(space, train_x, train_y)
        acquisition = _acquisition(model, train_x, train_y, reference_point)
        rows = _optimise(
            space, acquisition, q, num_restarts, raw_samples, max_enumerated, generator
        )
    finally:
        torch.set_num_threads(threads)
    centre = interior_point(space, seed) if space.constraints else None
    return [repair(space, row, centre) if centre is not None else space.decode(row) for row in rows]


def _optimise(
    space: SearchSpace,
    acquisition: Any,
    q: int,
    num_restarts: int,
    raw_samples: int,
    max_enumerated: int,
    generator: torch.Generator,
) -> list[list[float]]:
    """Encoded coordinates of ``q`` points maximising ``acquisition`` (see :func:`propose`)."""
    from botorch.optim.optimize_mixed import optimize_acqf_mixed_alternating

    bounds = torch.tensor(space.bounds(), dtype=DTYPE).T
    constraints = [
        (torch.tensor(indices), torch.tensor(coefficients, dtype=DTYPE), float(rhs))
        for indices, coefficients, rhs in space.encoded_constraints()
    ] or None
    choices = {
        d: [float(v) for v in range(len(space.parameters[d].values))] for d in space.cat_dims
    }
    combinations = [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # optimiser / numerical warnings: the result is checked after
        if len(combinations) > max_enumerated or len(choices) == space.dim:
            candidates, _ = optimize_acqf_mixed_alternating(
                acquisition,
                bounds,
                cat_dims=choices,
                q=q,
                inequality_constraints=constraints,
                num_restarts=num_restarts,
                raw_samples=raw_samples,
            )
            return candidates.detach().reshape(-1, space.dim).tolist()
        chosen: list[Tensor] = []
        for _ in range(q):
            acquisition.set_X_pending(torch.cat(chosen) if chosen else None)
            best, best_value = None, -float("inf")
            for fixed in combinations:
                point, value = _best_point(
                    acquisition,
                    space,
                    bounds,
                    constraints,
                    fixed,
                    num_restarts,
                    raw_samples,
                    generator,
                )
                if best is None or value > best_value:
                    best, best_value = point, value
            chosen.append(best)
        acquisition.set_X_pending(None)
    return torch.cat(chosen).tolist()
