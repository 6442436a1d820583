"""Every field of the ``oar-train`` schema (``TrainConfig`` and every dataclass nested in it) is read by the package.

A setting that is accepted but read by nothing does nothing, silently (``parallel.overlap_param_gather`` did). This
test parses every module of ``oar_megatron/`` (``ast``, no imports run) and looks for a read of each field:

* an attribute load ``<expr>.<field>`` (or ``getattr(<expr>, "<field>")``) whose receiver resolves to the field's
  dataclass: ``self`` in the dataclass's own methods, a parameter annotated with it, a local assigned from or
  looping over something that resolves, or an attribute chain through the schema (``cfg.rollout``, ``g.cfg`` is
  not needed: ``<anything>.rollout`` resolves to ``RolloutConfig`` because ``rollout`` names a config group);
* for a field name that no other schema dataclass uses, also a load whose receiver cannot be resolved (the name
  alone is then unambiguous); a name shared by several dataclasses (``timeout_s``, ``temperature``, ``every``,
  ...) needs a resolved receiver, so one group's reads never vouch for another's.

Reads inside ``validate`` / ``__post_init__`` of the schema dataclasses do not count: checking a value is not
using it (the dataclass's other methods count: ``ModelConfig.padded_vocab_size``, ``ParallelConfig.token_multiple``
are how the code reads those fields). ``GENERIC`` lists the fields read generically (``dataclasses.asdict``) with the place that does it; the
test checks that place still exists. Fields added later are checked the same way (the schema is walked, not
listed): a new field must be read, or be listed in ``GENERIC`` with its reader.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from collections import defaultdict
from pathlib import Path

import pytest

from oar_megatron.config.train import TrainConfig

PACKAGE = Path(__file__).resolve().parents[1] / "oar_megatron"
VALIDATORS = ("validate", "__post_init__")

# class name -> (module.Class.method that reads every field of it generically, why)
GENERIC = {
    "LossConfig": ("oar_megatron.config.algorithm.LossConfig.build",
                   "asdict(self) hands every loss option to PolicyLossConfig.for_method"),
}


def _unwrap(tp):
    """(dataclass, is_list) inside Optional / list annotations, else (None, False)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple, typing.Union) or str(origin) == "<class 'types.UnionType'>":
        for arg in typing.get_args(tp):
            cls, _ = _unwrap(arg)
            if cls is not None:
                return cls, origin in (list, tuple)
        return None, False
    return (tp, False) if dataclasses.is_dataclass(tp) else (None, False)


def schema() -> tuple[dict[str, type], dict[tuple[str, str], tuple[str, bool]]]:
    """Every dataclass reachable from TrainConfig by name, and (class, field) -> (nested class, is_list)."""
    classes: dict[str, type] = {}
    nested: dict[tuple[str, str], tuple[str, bool]] = {}
    todo = [TrainConfig]
    while todo:
        cls = todo.pop()
        if cls.__name__ in classes:
            continue
        classes[cls.__name__] = cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            sub, is_list = _unwrap(hints[f.name])
            if sub is not None:
                nested[(cls.__name__, f.name)] = (sub.__name__, is_list)
                todo.append(sub)
    return classes, nested


def _walk_scope(node):
    """``ast.walk`` that does not enter nested functions or classes (their bindings are their own)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        todo.extend(c for c in ast.iter_child_nodes(n)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))


class _Reads(ast.NodeVisitor):
    """Attribute loads of one module, each with the schema class its receiver resolves to (or None)."""

    def __init__(self, classes, nested):
        self.classes, self.nested = classes, nested
        self.group = defaultdict(set)  # attribute name -> {(class, is_list)} of nested config fields by that name
        for (owner, name), target in nested.items():
            self.group[name].add(target)
        self.reads: list[tuple[str | None, str]] = []  # (resolved class or None, attribute)
        self.env: list[dict[str, tuple[str, bool]]] = [{}]
        self.cls_stack: list[str | None] = []
        self.in_validator = 0

    # ------------------------------------------------------------------ resolution
    def _annotation(self, node) -> tuple[str, bool] | None:
        """The schema class an annotation names (``RolloutConfig``, ``"EvalConfig | None"``, ``list[X]``)."""
        if node is None:
            return None
        text = ast.unparse(node).strip("'\"")
        for word in re.findall(r"[A-Za-z_]\w*", text):
            if word in self.classes:
                return word, text.startswith(("list[", "List[", "Sequence[", "tuple["))
        return None

    def resolve(self, node) -> tuple[str, bool] | None:
        if isinstance(node, ast.Name):
            for scope in reversed(self.env):
                if node.id in scope:
                    return scope[node.id]
            return None
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            if owner is not None and not owner[1]:
                target = self.nested.get((owner[0], node.attr))
                if target is not None:
                    return target
            candidates = self.group.get(node.attr, set())
            if owner is None and len(candidates) == 1:
                return next(iter(candidates))
            return None
        if isinstance(node, ast.Subscript):
            inner = self.resolve(node.value)
            return (inner[0], False) if inner is not None and inner[1] else None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "validate":
            return self.resolve(node.func.value)  # cfg.validate() returns cfg
        return None

    def _bind(self, target, value_cls) -> None:
        if isinstance(target, ast.Name) and value_cls is not None:
            self.env[-1][target.id] = value_cls

    def _collect_bindings(self, body) -> None:
        """Flow-insensitive local bindings of a function body (two passes: chains of assignments)."""
        for _ in range(2):
            for node in body:
                for sub in _walk_scope(node):
                    if isinstance(sub, ast.Assign) and len(sub.targets) == 1:
                        self._bind(sub.targets[0], self.resolve(sub.value))
                    elif isinstance(sub, ast.AnnAssign):
                        self._bind(sub.target, self._annotation(sub.annotation) or self.resolve(sub.value)
                                   if sub.value is not None else self._annotation(sub.annotation))
                    elif isinstance(sub, (ast.For, ast.comprehension)):
                        it = self.resolve(sub.iter)
                        if it is not None and it[1]:
                            self._bind(sub.target, (it[0], False))
                    elif isinstance(sub, ast.NamedExpr):
                        self._bind(sub.target, self.resolve(sub.value))

    # ------------------------------------------------------------------ traversal
    def visit_ClassDef(self, node):
        self.cls_stack.append(node.name if node.name in self.classes else None)
        self.generic_visit(node)
        self.cls_stack.pop()

    def _function(self, node):
        scope: dict[str, tuple[str, bool]] = {}
        owner = self.cls_stack[-1] if self.cls_stack else None
        args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
        for i, a in enumerate(args):
            ann = self._annotation(a.annotation)
            if ann is not None:
                scope[a.arg] = ann
            elif i == 0 and owner is not None and a.arg == "self":
                scope["self"] = (owner, False)
        validator = owner is not None and node.name in VALIDATORS
        self.env.append(scope)
        self.in_validator += validator
        self._collect_bindings(node.body)
        for stmt in node.body:
            self.visit(stmt)
        self.in_validator -= validator
        self.env.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Attribute(self, node):
        if isinstance(node.ctx, ast.Load) and not self.in_validator:
            owner = self.resolve(node.value)
            self.reads.append((owner[0] if owner is not None and not owner[1] else None, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node):
        if (isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and not self.in_validator):
            owner = self.resolve(node.args[0])
            self.reads.append((owner[0] if owner is not None and not owner[1] else None, node.args[1].value))
        self.generic_visit(node)

    def visit_Module(self, node):
        self._collect_bindings(node.body)
        self.generic_visit(node)


def unread_fields() -> list[str]:
    classes, nested = schema()
    owners = defaultdict(set)  # field name -> classes that have it
    for name, cls in classes.items():
        for f in dataclasses.fields(cls):
            owners[f.name].add(name)
    resolved, unresolved = set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Reads(classes, nested)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        for owner, attr in visitor.reads:
            (resolved.add((owner, attr)) if owner is not None else unresolved.add(attr))
    missing = []
    for name, cls in sorted(classes.items()):
        if name in GENERIC:
            continue
        for f in dataclasses.fields(cls):
            if (name, f.name) in resolved:
                continue
            if len(owners[f.name]) == 1 and f.name in unresolved:
                continue
            missing.append(f"{name}.{f.name}")
    return missing


def test_every_schema_field_is_read_by_the_package():
    missing = unread_fields()
    assert not missing, ("schema fields read nowhere in oar_megatron/ (outside validate): wire them, remove them "
                         f"from the schema and configs/, or list a generic reader in GENERIC: {missing}")


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_generic_readers_exist(name):
    import importlib

    where, _ = GENERIC[name]
    module, cls, method = where.rsplit(".", 2)
    src = inspect.getsource(getattr(getattr(importlib.import_module(module), cls), method))
    assert "asdict(self)" in src, f"{where} no longer reads every field of {name} (GENERIC is stale)"


def test_the_walk_sees_nested_groups_and_finds_an_unread_field():
    """The walk is not vacuous: nested groups are found, and a field read only in validate() is reported."""
    classes, nested = schema()
    for name in ("ModelConfig", "ParallelConfig", "AlgorithmConfig", "OptimConfig", "RolloutConfig", "DataConfig",
                 "RewardConfig", "EvalConfig", "TrainerConfig", "CheckpointConfig", "LoggingConfig", "LossConfig",
                 "ShaperConfig", "SyntheticConfig", "OverlongConfig", "EvalDatasetConfig"):
        assert name in classes, name
    assert nested[("EvalConfig", "datasets")] == ("EvalDatasetConfig", True)
    src = '''
from dataclasses import dataclass

@dataclass
class Probe:
    used: int = 0
    checked_only: int = 0
    def validate(self):
        assert self.checked_only >= 0

def consumer(p: Probe):
    return p.used
'''
    tree = ast.parse(src)
    probe_classes = {"Probe": None}
    visitor = _Reads(probe_classes, {})
    visitor.visit(tree)
    reads = {(o, a) for o, a in visitor.reads if o is not None}
    assert ("Probe", "used") in reads and ("Probe", "checked_only") not in reads
