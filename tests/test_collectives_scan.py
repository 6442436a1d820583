"""Only ``oar_megatron/collectives.py`` may issue ``torch.distributed`` collectives (docs/architecture.md,
"Communication"): the package's source is parsed and every reference to a collective of ``torch.distributed``
elsewhere fails this test. Process-group management (init/destroy/new_group, ranks and sizes, backends) is allowed."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oar_megatron"
ALLOWED_MODULE = PACKAGE / "collectives.py"
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")
COLLECTIVES = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "_all_gather_base", "all_to_all", "all_to_all_single", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "scatter",
    "scatter_object_list", "gather", "gather_object", "send", "recv", "isend", "irecv", "send_object_list",
    "recv_object_list", "batch_isend_irecv", "barrier", "monitored_barrier",
})


def collective_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every reference to a ``torch.distributed`` collective in ``source``."""
    tree = ast.parse(source)
    dist_aliases: set[str] = set()  # names bound to torch.distributed (or distributed_c10d)
    torch_aliases: set[str] = set()  # names bound to the torch package
    hits: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    dist_aliases.add(a.asname)
                elif a.name.split(".")[0] == "torch":
                    torch_aliases.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if node.module in DIST_MODULES and a.name in COLLECTIVES:
                    hits.append((node.lineno, a.name))
                elif node.module in DIST_MODULES and a.name == "distributed_c10d":
                    dist_aliases.add(a.asname or a.name)
                elif node.module == "torch" and a.name == "distributed":
                    dist_aliases.add(a.asname or a.name)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES):
            continue
        chain, base = [], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name):
            continue
        path = [base.id, *reversed(chain)]
        if (path[0] in dist_aliases and path[1:] in ([], ["distributed_c10d"])) or (
                path[0] in torch_aliases and path[1:] in (["distributed"], ["distributed", "distributed_c10d"])):
            hits.append((node.lineno, node.attr))
    return hits


def test_the_scanner_sees_every_spelling():
    src = (
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as D\n"
        "from torch.distributed import barrier\nimport torch.distributed.distributed_c10d as c10d\n"
        "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nD.send(x, 1)\nc10d.all_gather_object(a, b)\n"
        "torch.distributed.distributed_c10d.recv(x, 0)\nf = dist.isend\n"
        "dist.get_rank(); dist.new_group([0, 1]); dist.ReduceOp.SUM; other.all_reduce(x)\n"
    )
    assert sorted(collective_uses(src)) == [(4, "barrier"), (6, "all_reduce"), (7, "broadcast"), (8, "send"),
                                            (9, "all_gather_object"), (10, "recv"), (11, "isend")]


def test_only_the_collectives_module_calls_torch_distributed_collectives():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == ALLOWED_MODULE:
            continue
        for line, name in collective_uses(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: torch.distributed.{name}")
    assert not offenders, "use oar_megatron.collectives instead:\n" + "\n".join(offenders)
    assert len(collective_uses(ALLOWED_MODULE.read_text())) >= 8  # the module itself is seen by the scanner
