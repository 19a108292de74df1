"""Search spaces of the sweep: parameters, derived values, linear constraints and the encoding
that the Gaussian process sees.

A space is plain data (``sweep.space`` in the config, e.g. ``conf/sweep/paper.yaml``)::

    parameters:
      lambda1: {type: float, low: 0.0, high: 1.0, target: loss.ce_weight}
      wd: {type: float, low: 1.0e-7, high: 1.0, log: true, target: model.weight_decay}
      lambda_area: {type: choice, values: [0.5, 1.0, 2.0], target: loss.area_power}
    derived:
      lambda3: {expression: 1 - lambda1 - lambda2, target: loss.variation_weight, low: 0.0}
    constraints: ["lambda1 + lambda2 <= 1"]
    overrides: [loss=paper]

Encoding: a float or int parameter becomes u in [0, 1] (of log(value) when ``log``); a choice
becomes its index 0..k-1 (a categorical dimension of the GP). Linear constraints may only involve
float parameters on a linear scale, so that they stay linear in u (BoTorch's
``inequality_constraints``).
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = ("float", "int", "choice")
# tolerance of the constraint checks, in parameter units
FEASIBILITY_TOLERANCE = 1e-9


class SpaceError(ValueError):
    """A search space definition that cannot be used (the message names the problem)."""


@dataclass(frozen=True)
class Parameter:
    """One searched hyperparameter.

    Args:
        name: its name in the space (and in the journal).
        kind: ``float``, ``int`` or ``choice``.
        target: the training config key it overrides (``loss.ce_weight``), or a config group
            (``loss``) for a choice of group options; None: not passed to the trials.
        low, high: bounds (float, int), inclusive.
        log: search on a log scale (float, int; needs low > 0).
        values: the options of a choice (numbers, strings or booleans).
    """

    name: str
    kind: str
    target: str | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpaceError(
                f"parameter {self.name}: type must be one of {KINDS}, got {self.kind!r}"
            )
        if self.kind == "choice":
            if len(self.values) < 1:
                raise SpaceError(f"parameter {self.name}: a choice needs at least one value")
            if len(set(map(repr, self.values))) != len(self.values):
                raise SpaceError(
                    f"parameter {self.name}: repeated choice values {list(self.values)}"
                )
            return
        if self.low is None or self.high is None:
            raise SpaceError(f"parameter {self.name}: {self.kind} needs low and high")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not self.low < self.high:
            raise SpaceError(
                f"parameter {self.name}: needs finite low < high, got [{self.low}, {self.high}]"
            )
        if self.log and self.low <= 0:
            raise SpaceError(f"parameter {self.name}: a log scale needs low > 0, got {self.low}")
        if self.kind == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise SpaceError(
                f"parameter {self.name}: int bounds must be integers, got [{self.low}, {self.high}]"
            )

    @property
    def is_choice(self) -> bool:
        return self.kind == "choice"

    @property
    def is_linear_float(self) -> bool:
        """A float on a linear scale: the only kind a linear constraint may involve."""
        return self.kind == "float" and not self.log

    def _scale(self, value: float) -> float:
        return math.log(value) if self.log else value

    def _unscale(self, value: float) -> float:
        return math.exp(value) if self.log else value

    def _edges(self) -> tuple[float, float]:
        """The interval that u in [0, 1] spans on the (log) scale; an int's is widened by half a
        step on each side so that every integer gets a cell of equal width (log ints: low >= 1)."""
        if self.kind == "int":
            return self._scale(self.low - 0.5), self._scale(self.high + 0.5)
        return self._scale(self.low), self._scale(self.high)

    def decode(self, coordinate: float) -> Any:
        """The value at encoded coordinate (u in [0, 1], or a choice index)."""
        if self.is_choice:
            index = min(max(int(round(coordinate)), 0), len(self.values) - 1)
            return self.values[index]
        u = min(max(float(coordinate), 0.0), 1.0)
        low, high = self._edges()
        raw = low + u * (high - low)
        if self.kind == "int":
            return int(min(max(round(self._unscale(raw)), self.low), self.high))
        # exp/log round trips can leave the interval by one ulp
        return min(max(self._unscale(raw), self.low), self.high)

    def encode(self, value: Any) -> float:
        """The encoded coordinate of ``value`` (inverse of :meth:`decode` up to int rounding)."""
        self.validate(value)
        if self.is_choice:
            return float(self.index(value))
        low, high = self._edges()
        return (self._scale(float(value)) - low) / (high - low)

    def index(self, value: Any) -> int:
        """Index of a choice value (numbers compare by value: 1 == 1.0)."""
        for position, option in enumerate(self.values):
            if _same_value(option, value):
                return position
        raise SpaceError(f"parameter {self.name}: {value!r} is not one of {list(self.values)}")

    def validate(self, value: Any) -> None:
        """Raise :class:`SpaceError` unless ``value`` is a valid value of this parameter."""
        if self.is_choice:
            self.index(value)
            return
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise SpaceError(f"parameter {self.name}: expected a finite number, got {value!r}")
        if self.kind == "int" and value != int(value):
            raise SpaceError(f"parameter {self.name}: expected an integer, got {value!r}")
        if not self.low - FEASIBILITY_TOLERANCE <= value <= self.high + FEASIBILITY_TOLERANCE:
            raise SpaceError(
                f"parameter {self.name}: {value!r} is outside [{self.low}, {self.high}]"
            )


def _same_value(a: Any, b: Any) -> bool:
    numeric = (int, float)
    if (
        isinstance(a, numeric)
        and isinstance(b, numeric)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0) or a == b
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# Expressions: a safe evaluator (derived values, the scalar objective) and linear forms
# (constraints), both on Python's own parser.

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _parse(text: str, mode: str, what: str) -> ast.AST:
    try:
        return ast.parse(str(text).strip(), mode=mode)
    except SyntaxError as error:
        raise SpaceError(f"{what}: cannot parse {text!r} ({error.msg})") from None


def expression_names(text: str) -> set[str]:
    """The variable names used in an expression."""
    return {
        node.id
        for node in ast.walk(_parse(text, "eval", "expression"))
        if isinstance(node, ast.Name)
    }


def evaluate_expression(text: str, variables: Mapping[str, float]) -> float:
    """Evaluate an arithmetic expression (numbers, names, + - * / **, parentheses).

    Raises:
        SpaceError: for an unknown name or anything but arithmetic.
    """

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise SpaceError(
                    f"expression {text!r}: unknown name {node.id!r} (known: {sorted(variables)})"
                )
            return float(variables[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        raise SpaceError(f"expression {text!r}: only numbers, names and + - * / ** are allowed")

    return walk(_parse(text, "eval", "expression"))


def _linear_form(node: ast.AST, text: str) -> dict[str | None, float]:
    """``{name: coefficient, None: constant}`` of a linear expression."""
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return {None: float(node.value)}
    if isinstance(node, ast.Name):
        return {node.id: 1.0}
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return {k: sign * v for k, v in _linear_form(node.operand, text).items()}
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, right = _linear_form(node.left, text), _linear_form(node.right, text)
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        result = dict(left)
        for key, value in right.items():
            result[key] = result.get(key, 0.0) + sign * value
        return result
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
        left, right = _linear_form(node.left, text), _linear_form(node.right, text)
        if set(right) == {None}:
            factor = right[None] if isinstance(node.op, ast.Mult) else 1.0 / right[None]
            return {k: v * factor for k, v in left.items()}
        if set(left) == {None} and isinstance(node.op, ast.Mult):
            return {k: v * left[None] for k, v in right.items()}
    raise SpaceError(
        f"constraint {text!r}: not a linear expression (use numbers, names, + - and constant factors)"
    )


@dataclass(frozen=True)
class LinearConstraint:
    """``sum(coefficients[name] * params[name]) <= upper`` (the source text kept for messages)."""

    coefficients: Mapping[str, float]
    upper: float
    text: str

    def slack(self, params: Mapping[str, Any]) -> float:
        """upper - lhs: >= 0 when satisfied."""
        return self.upper - sum(c * float(params[name]) for name, c in self.coefficients.items())


def parse_constraints(text: str) -> list[LinearConstraint]:
    """``"a + b <= 1"``, ``"0.85 <= a + b"``, ``"0 <= a - b <= 1"`` -> linear constraints."""
    tree = _parse(text, "eval", f"constraint {text!r}").body
    if not isinstance(tree, ast.Compare):
        raise SpaceError(f"constraint {text!r}: expected an inequality with <= or >=")
    sides = [tree.left, *tree.comparators]
    constraints = []
    for left, op, right in zip(sides[:-1], tree.ops, sides[1:]):
        if isinstance(op, (ast.LtE, ast.Lt)):
            low_side, high_side = left, right
        elif isinstance(op, (ast.GtE, ast.Gt)):
            low_side, high_side = right, left
        else:
            raise SpaceError(f"constraint {text!r}: only <=, <, >=, > are allowed")
        # low_side <= high_side  <=>  low_side - high_side <= 0
        form = _linear_form(low_side, text)
        for key, value in _linear_form(high_side, text).items():
            form[key] = form.get(key, 0.0) - value
        constant = form.pop(None, 0.0)
        coefficients = {k: v for k, v in form.items() if v != 0.0}
        if not coefficients:
            raise SpaceError(f"constraint {text!r}: involves no parameter")
        constraints.append(LinearConstraint(coefficients, -constant, str(text)))
    return constraints


@dataclass(frozen=True)
class Derived:
    """A value computed from the parameters (``expression``), clipped to [low, high] when given
    (so float rounding cannot push ``1 - a - b`` to -1e-17), and passed to ``target``."""

    name: str
    expression: str
    target: str | None = None
    low: float | None = None
    high: float | None = None

    def evaluate(self, params: Mapping[str, Any]) -> float:
        value = evaluate_expression(self.expression, params)
        if self.low is not None and value < self.low:
            if value < self.low - 1e-6:
                raise SpaceError(
                    f"derived {self.name} = {self.expression} = {value} is below its low {self.low}: add a constraint"
                )
            value = float(self.low)
        if self.high is not None and value > self.high:
            if value > self.high + 1e-6:
                raise SpaceError(
                    f"derived {self.name} = {self.expression} = {value} is above its high {self.high}: add a constraint"
                )
            value = float(self.high)
        return value


@dataclass
class SearchSpace:
    """Parameters (in declaration order: the GP's input dimensions), derived values, linear
    constraints, and plain overrides for every trial."""

    parameters: list[Parameter]
    derived: list[Derived] = field(default_factory=list)
    constraints: list[LinearConstraint] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.parameters:
            raise SpaceError("a search space needs at least one parameter")
        names = [p.name for p in self.parameters] + [d.name for d in self.derived]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SpaceError(f"repeated names in the space: {duplicates}")
        by_name = {p.name: p for p in self.parameters}
        for constraint in self.constraints:
            for name in constraint.coefficients:
                if name not in by_name:
                    raise SpaceError(
                        f"constraint {constraint.text!r}: unknown parameter {name!r} (known: {sorted(by_name)})"
                    )
                if not by_name[name].is_linear_float:
                    raise SpaceError(
                        f"constraint {constraint.text!r}: {name} is a {by_name[name].kind}"
                        f"{' on a log scale' if by_name[name].log else ''}; linear constraints may only involve float parameters on a linear scale"
                    )
        known = set(by_name)
        for derived in self.derived:
            unknown = expression_names(derived.expression) - known
            if unknown:
                raise SpaceError(
                    f"derived {derived.name} = {derived.expression}: unknown names {sorted(unknown)}"
                )
            evaluate_expression(derived.expression, {n: 1.0 for n in known})  # syntax check
            known.add(derived.name)  # later derived values may use earlier ones

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SearchSpace:
        """Build from the mapping of ``sweep.space`` (see the module docstring)."""
        config = dict(config or {})
        unknown = set(config) - {"parameters", "derived", "constraints", "overrides"}
        if unknown:
            raise SpaceError(
                f"unknown keys in the space: {sorted(unknown)} (expected parameters, derived, constraints, overrides)"
            )
        parameters = []
        for name, spec in dict(config.get("parameters") or {}).items():
            spec = dict(spec or {})
            extra = set(spec) - {"type", "low", "high", "log", "values", "target"}
            if extra:
                raise SpaceError(f"parameter {name}: unknown keys {sorted(extra)}")
            kind = str(spec.get("type", "float"))
            parameters.append(
                Parameter(
                    name=str(name),
                    kind=kind,
                    target=spec.get("target"),
                    low=None if spec.get("low") is None else float(spec["low"]),
                    high=None if spec.get("high") is None else float(spec["high"]),
                    log=bool(spec.get("log", False)),
                    values=tuple(spec.get("values") or ()),
                )
            )
        derived = []
        for name, spec in dict(config.get("derived") or {}).items():
            spec = dict(spec or {})
            if "expression" not in spec:
                raise SpaceError(f"derived {name}: needs an expression")
            derived.append(
                Derived(
                    name=str(name),
                    expression=str(spec["expression"]),
                    target=spec.get("target"),
                    low=None if spec.get("low") is None else float(spec["low"]),
                    high=None if spec.get("high") is None else float(spec["high"]),
                )
            )
        constraints = [
            c for text in (config.get("constraints") or []) for c in parse_constraints(str(text))
        ]
        overrides = [str(o) for o in (config.get("overrides") or [])]
        return cls(parameters, derived, constraints, overrides)

    # -- shapes -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def dim(self) -> int:
        return len(self.parameters)

    @property
    def cat_dims(self) -> list[int]:
        """Indices of the choice parameters (categorical GP dimensions)."""
        return [i for i, p in enumerate(self.parameters) if p.is_choice]

    def bounds(self) -> list[tuple[float, float]]:
        """Per dimension (low, high) of the encoding: (0, 1), or (0, k - 1) for a choice."""
        return [
            (0.0, float(len(p.values) - 1)) if p.is_choice else (0.0, 1.0) for p in self.parameters
        ]

    # -- encoding -----------------------------------------------------------------------------

    def encode(self, params: Mapping[str, Any]) -> list[float]:
        """Encoded coordinates (length ``dim``) of a parameter dict (derived entries ignored)."""
        missing = [n for n in self.names if n not in params]
        if missing:
            raise SpaceError(f"parameters {missing} missing from {dict(params)}")
        return [p.encode(params[p.name]) for p in self.parameters]

    def decode(self, coordinates: Sequence[float]) -> dict[str, Any]:
        """Searched parameters at encoded ``coordinates`` (no derived values)."""
        if len(coordinates) != self.dim:
            raise SpaceError(f"expected {self.dim} coordinates, got {len(coordinates)}")
        return {p.name: p.decode(float(u)) for p, u in zip(self.parameters, coordinates)}

    def from_unit(self, unit: Sequence[float]) -> list[float]:
        """Map a point of the unit cube (e.g. a Sobol point) to encoded coordinates: choices
        take the cell floor(u * k)."""
        return [
            float(min(int(u * len(p.values)), len(p.values) - 1)) if p.is_choice else float(u)
            for p, u in zip(self.parameters, unit)
        ]

    def complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Searched parameters plus the derived values (in declaration order)."""
        values = {n: params[n] for n in self.names}
        for derived in self.derived:
            values[derived.name] = derived.evaluate(values)
        return values

    # -- constraints --------------------------------------------------------------------------

    def violations(
        self, params: Mapping[str, Any], tolerance: float = FEASIBILITY_TOLERANCE
    ) -> list[str]:
        """Texts of the constraints that ``params`` violates (and invalid values)."""
        problems = []
        for parameter in self.parameters:
            try:
                parameter.validate(params[parameter.name])
            except (SpaceError, KeyError) as error:
                problems.append(str(error))
        if problems:
            return problems
        return [
            f"{c.text} (slack {c.slack(params):.3g})"
            for c in self.constraints
            if c.slack(params) < -tolerance
        ]

    def is_feasible(
        self, params: Mapping[str, Any], tolerance: float = FEASIBILITY_TOLERANCE
    ) -> bool:
        return not self.violations(params, tolerance)

    def encoded_constraints(self) -> list[tuple[list[int], list[float], float]]:
        """The constraints on the encoded coordinates, as BoTorch's ``(indices, coefficients,
        rhs)`` meaning ``sum(coefficients * x[indices]) >= rhs``.

        With p = low + (high - low) * u: ``sum a p <= b`` becomes
        ``sum (-a (high - low)) u >= -(b - sum a low)``.
        """
        position = {p.name: i for i, p in enumerate(self.parameters)}
        by_name = {p.name: p for p in self.parameters}
        result = []
        for constraint in self.constraints:
            indices, coefficients = [], []
            offset = 0.0
            for name, a in constraint.coefficients.items():
                parameter = by_name[name]
                indices.append(position[name])
                coefficients.append(-a * (parameter.high - parameter.low))
                offset += a * parameter.low
            result.append((indices, coefficients, -(constraint.upper - offset)))
        return result

    # -- overrides ----------------------------------------------------------------------------

    def targets(self) -> dict[str, str]:
        """``{name: target}`` of every parameter and derived value that has a target."""
        entries = [(p.name, p.target) for p in self.parameters] + [
            (d.name, d.target) for d in self.derived
        ]
        return {name: target for name, target in entries if target}

    def trial_overrides(self, params: Mapping[str, Any]) -> list[str]:
        """Hydra overrides of a trial: the space's plain overrides, then ``target=value`` for
        every parameter and derived value (``params`` as returned by :meth:`complete`)."""
        return list(self.overrides) + [
            f"{target}={format_override_value(params[name])}"
            for name, target in self.targets().items()
        ]


_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_.\-/+]+")


def format_override_value(value: Any) -> str:
    """A Python value as a Hydra override value (floats round-trip exactly via repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SpaceError(f"cannot pass the non-finite value {value} to a trial")
        return repr(value)
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
