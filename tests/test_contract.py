"""Project contract: README's two commands, CI running README's test command, and the numerics layer free of
Megatron/Hydra imports."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 2, blocks
    run_cmd, test_cmd = blocks
    assert run_cmd.endswith(".venv/bin/oar-train") and "pytest" in test_cmd
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert test_cmd in ci_lines, f"CI must run README's test command {test_cmd!r}"


def test_numerics_import_neither_megatron_nor_hydra():
    for path in (ROOT / "oar_megatron" / "algorithms").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for n in names:
                root = n.split(".")[0]
                assert root not in ("megatron", "hydra", "omegaconf", "transformer_engine", "apex"), f"{path.name} imports {n}"
