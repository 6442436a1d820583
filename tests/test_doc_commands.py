"""Every command shown in README.md and docs/*.md is run by a test, or marked GPU-only.

**What counts as a command**

1. Every line of a fenced block tagged ``bash``, ``sh``, ``shell`` or ``console`` (blank and comment-only lines
   skipped, a trailing backslash joins lines, a leading ``$ `` is dropped). A line is split into its commands at
   `` && ``, ``;``, `` | `` and a trailing ``&``; leading ``VAR=value`` assignments are dropped.
2. An inline code span (outside fences) that starts with a program (``PROGRAMS``: ``oar-train``, ``oar-eval``,
   ``oar-convert``, ``python``, ``bash``, ``pip``, ``torchrun``, ``sbatch``, ``srun``, ``docker``, ... also under
   ``.venv/bin/``) followed by at least one argument. A program name alone (`` `oar-train` ``) and a message that
   starts with one (`` `oar-train: preflight: ...` ``) are not commands.
3. A fenced block without a tag must not hold a command (tag it ``bash``): checked, so rule 1 sees them all.

**GPU-only** (one convention, visible to readers): in a fenced block, a ``# GPU-only`` comment at the end of the
command's line (more text may follow: ``# GPU-only: needs TE``), or the line ``<!-- gpu-only -->`` right before the
fence for every command of the block; inline, ``(GPU-only)`` or ``(GPU-only: why)`` right after the span. GPU-only commands are
listed, not run.

**Every other command is run**, by this test in the cheap form of its program (``RUNNERS``), or by another test or
CI script that contains it verbatim (``MAPPED``: command → file; the check reads the file, so the mapping cannot
rot). Cheap forms, all under a 2-minute budget on an idle machine:

* ``oar-train ARGS``: composed and run in-process with ``trainer.dry_run=true`` appended: Hydra composes the
  config, ``TrainConfig.validate`` checks it against the world size and the plan prints (exit code 0 required);
  Hydra flags (``--cfg job``) run the console entry point in a subprocess.
* ``oar-eval ARGS``: composed and validated as ``oar-eval`` does before it loads the checkpoint.
* ``bash launch/torchrun.sh N ARGS``: with N ≤ 2 the real launcher runs N ranks with ``trainer.dry_run=true``; a
  larger N is validated in-process against N ranks (``trainer.world_size=N``).
* ``oar-convert SUB ARGS`` and ``python SCRIPT ARGS`` / ``python -m MODULE ARGS``: ``--help`` of the subcommand /
  script must succeed and list every ``--flag`` the documented command uses (they run heavy conversions and
  benchmarks; the conversions themselves are run by tests/convert/); an ``oar-convert`` command with arguments
  must also parse with oar-convert's own parser (placeholders as ``1``), so positionals and values are checked.

Placeholders (an argument with ``...``, ``<...>``, an ALL-CAPS word such as ``HF_DIR``, ``N``, ``RUN/checkpoints``,
or ``/path/to/``) are dropped before a dry run; flags inside ``[...]`` synopses are checked like the others.
Slurm and Docker commands (docs/slurm.md, docs/docker.md) plug in the same way: a runner for their program, or a
``MAPPED`` entry naming the test that submits / builds them.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass

import pytest

from tests.doc_markdown import ROOT, fenced_blocks, inline_spans

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("bash", "sh", "shell", "console")
PROGRAMS = ("oar-train", "oar-eval", "oar-convert", "python", "python3", "bash", "sh", "pip", "pip3", "torchrun",
            "sbatch", "srun", "salloc", "docker", "pytest", "hadolint", "uv")
GPU_ONLY_COMMENT = re.compile(r"#\s*GPU-only\b")
GPU_ONLY_BLOCK = "<!-- gpu-only -->"
GPU_ONLY_INLINE = "(GPU-only"  # "(GPU-only)" or "(GPU-only: why)"
ENV_ASSIGN = re.compile(r"""^(?:[A-Za-z_][A-Za-z0-9_]*=(?:"[^"]*"|'[^']*'|\S*)\s+)+""")
PLACEHOLDER = re.compile(r"\.\.\.|…|<[^<>]+>|/path/to/|(?<![A-Za-z0-9_.-])[A-Z][A-Z0-9_]*(?![A-Za-z0-9])")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# command (as written, whitespace normalised) -> the file that runs it verbatim (a test, or the CI script)
MAPPED = {
    "bash launch/setup_cpu.sh": ".ci/run",
    ".venv/bin/python -m pytest -q": ".ci/run",
    "bash launch/setup_sglang_cpu.sh": ".ci/run",
    "bash launch/setup_docker.sh": ".ci/run",
    "docker build --network host -f docker/Dockerfile.cpu --build-arg BASE=local/bookworm:minbase --build-arg "
    "WHEELHOUSE=docker/wheelhouse -t oar_megatron:cpu-test .": "tests/docker/test_cpu_image.py",
    "docker run --rm --network none -v /tmp/oar-docker:/out oar_megatron:cpu-test oar-train logging.run_dir=/out/run":
        "tests/docker/test_cpu_image.py",
    "docker run --rm --network none oar_megatron:cpu-test python -m pytest -q -p no:cacheprovider tests/algorithms "
    "tests/trainer/test_app_config.py": "tests/docker/test_cpu_image.py",
    "sbatch --nodes 2 --ntasks-per-node 1 --output /tmp/slurm-demo.out launch/slurm.sh trainer.steps=5 "
    "eval.at_end=false": "tests/launch/test_slurm.py",
}


@dataclass
class Command:
    doc: str  # README.md, docs/x.md
    line: int
    text: str  # one command, whitespace normalised, comment and VAR= prefixes dropped
    gpu_only: bool

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def argv(self) -> list[str]:
        try:
            return shlex.split(self.text, posix=True)
        except ValueError:  # unbalanced quotes in a synopsis: plain words
            return self.text.split()

    @property
    def program(self) -> str:
        argv = self.argv
        return argv[0].removeprefix(".venv/bin/") if argv else ""


def _split_commands(line: str) -> list[str]:
    parts = re.split(r"\s&&\s|;\s*|\s\|\s|\s&(?:\s|$)", line)
    return [" ".join(ENV_ASSIGN.sub("", p.strip()).split()) for p in parts if p.strip()]


def _starts_with_program(text: str) -> bool:
    first = text.split()[0] if text.split() else ""
    return first.removeprefix(".venv/bin/") in PROGRAMS


def commands_of(text: str, doc: str) -> tuple[list[Command], list[str]]:
    """The commands of one Markdown text (rules in the module docstring) and the untagged fences holding one."""
    out: list[Command] = []
    untagged: list[str] = []
    for block in fenced_blocks(text):
        if block.info in SHELL:
            whole_gpu = block.before == GPU_ONLY_BLOCK
            pending, start = "", block.line
            for k, raw in enumerate(block.lines):
                if not pending:
                    start = block.line + k
                line = raw.strip()
                if line.endswith("\\"):
                    pending += line[:-1] + " "
                    continue
                line, pending = pending + line, ""
                line = line.removeprefix("$ ")
                code, _, comment = line.partition(" #") if not line.startswith("#") else ("", "", line)
                if not code.strip():
                    continue
                gpu = whole_gpu or bool(GPU_ONLY_COMMENT.search("#" + comment))
                out += [Command(doc, start, c, gpu) for c in _split_commands(code)]
        elif block.info == "":
            for k, raw in enumerate(block.lines):
                if _starts_with_program(ENV_ASSIGN.sub("", raw.strip().removeprefix("$ "))):
                    untagged.append(f"{doc}:{block.line + k}: {raw.strip()}")
    for span in inline_spans(text):
        words = ENV_ASSIGN.sub("", span.text).split()
        if len(words) < 2 or not _starts_with_program(" ".join(words)):
            continue
        gpu = span.after.lstrip().startswith(GPU_ONLY_INLINE)
        out += [Command(doc, span.line, c, gpu) for c in _split_commands(span.text)]
    return out, untagged


def all_commands() -> tuple[list[Command], list[str]]:
    cmds, untagged = [], []
    for path in DOCS:
        c, u = commands_of(path.read_text(), str(path.relative_to(ROOT)))
        cmds += c
        untagged += u
    return cmds, untagged


# ------------------------------------------------------------------------------------------------ runners

def _drop_placeholders(args: list[str]) -> list[str]:
    return [a for a in args if not PLACEHOLDER.search(a)]


def _launcher(cmd: Command) -> tuple[int | None, list[str]] | None:
    """``bash launch/torchrun.sh N ARGS`` → (N or None when a placeholder, ARGS); None for other commands."""
    argv = cmd.argv
    if cmd.program == "bash" and len(argv) >= 2 and argv[1] in ("launch/torchrun.sh", "./launch/torchrun.sh"):
        n = argv[2] if len(argv) > 2 else ""
        return (int(n) if n.isdigit() else None), argv[3:]
    return None


def kind_of(cmd: Command) -> str | None:
    """Which runner runs ``cmd`` (None: none; it must be GPU-only or MAPPED)."""
    argv = cmd.argv
    if cmd.program == "oar-train":
        return "hydra-cli" if any(a.startswith("-") for a in argv[1:]) else "oar-train"
    if cmd.program == "oar-eval":
        return "oar-eval"
    if cmd.program == "oar-convert":
        return "oar-convert"
    launch = _launcher(cmd)
    if launch is not None:
        return None if launch[0] is None else ("torchrun" if launch[0] <= 2 else "oar-train")
    if cmd.program in ("python", "python3") and len(argv) >= 2:
        if argv[1] == "-m" and len(argv) >= 3 and argv[2] != "pytest":
            return "python-help"
        if argv[1].endswith(".py") and (ROOT / argv[1]).is_file():
            return "python-help"
    return None


def _mapped(cmd: Command) -> str | None:
    target = MAPPED.get(cmd.text)
    if target is None:
        return None
    text = " ".join((ROOT / target).read_text().split())
    assert cmd.text in text, f"{cmd.where}: MAPPED to {target}, which no longer runs it"
    return target


def classify() -> dict[str, list[Command]]:
    cmds, untagged = all_commands()
    assert not untagged, ("untagged fenced blocks hold commands (tag them ```bash so they are checked):\n"
                          + "\n".join(untagged))
    by_kind: dict[str, list[Command]] = defaultdict(list)
    orphans = []
    for cmd in cmds:
        if cmd.gpu_only:
            by_kind["gpu-only"].append(cmd)
        elif _mapped(cmd):
            by_kind["mapped"].append(cmd)
        elif (kind := kind_of(cmd)) is not None:
            by_kind[kind].append(cmd)
        else:
            orphans.append(cmd.where)
    assert not orphans, ("documented commands neither run by a test nor marked GPU-only (tests/test_doc_commands.py "
                         "docstring: add a cheap runner, a MAPPED entry, or the GPU-only marker):\n"
                         + "\n".join(orphans))
    return by_kind


@pytest.fixture(scope="module")
def by_kind() -> dict[str, list[Command]]:
    return classify()


def _unique(cmds: list[Command]) -> list[Command]:
    seen, out = set(), []
    for c in cmds:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def test_every_documented_command_is_run_or_gpu_only(by_kind):
    counts = {k: len(v) for k, v in by_kind.items()}
    assert counts.get("oar-train", 0) >= 20 and counts.get("oar-convert", 0) >= 10, counts
    # the README's two commands are CI's (tests/test_contract.py keeps them identical)
    readme = [c.text for c in by_kind["mapped"] if c.doc == "README.md"]
    assert "bash launch/setup_cpu.sh" in readme and ".venv/bin/python -m pytest -q" in readme


def _config_args(cmd: Command) -> tuple[list[str], int | None]:
    launch = _launcher(cmd)
    if launch is not None:
        n, args = launch
        return _drop_placeholders(args), n
    return _drop_placeholders(cmd.argv[1:]), None


def test_oar_train_and_eval_commands_compose_and_validate(by_kind, capsys):
    """In-process: each oar-train command as a dry run (plan printed, exit code 0), each oar-eval command's config
    validated; launcher commands with more than 2 ranks against their rank count."""
    from oar_megatron.trainer.app import run_train
    from oar_megatron.trainer.compose import compose_config

    failures = []
    for cmd in _unique(by_kind.get("oar-train", []) + by_kind.get("oar-eval", [])):
        args, nproc = _config_args(cmd)
        if nproc is not None:
            args = args + [f"trainer.world_size={nproc}"]
        try:
            cfg = compose_config(args + ["trainer.dry_run=true"])
            if cmd.program == "oar-eval":
                cfg.validate(cfg.trainer.world_size or 1)
                continue
            rc = run_train(cfg)
        except Exception as exc:  # noqa: BLE001 - reported with the command
            failures.append(f"{cmd.where}\n    {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        out = capsys.readouterr()
        if rc != 0 or "layout" not in out.out:
            failures.append(f"{cmd.where}\n    exit {rc}: {out.err.strip()[-300:]}")
    assert not failures, "documented oar-train / oar-eval commands that do not compose and validate:\n" + \
        "\n".join(failures)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_launcher_and_hydra_commands_run(by_kind, tmp_path):
    """The real launcher (torchrun.sh, N <= 2 ranks) and Hydra's own flags, each a dry run in a subprocess."""
    failures = []
    for cmd in _unique(by_kind.get("torchrun", [])):
        n, args = _launcher(cmd)
        argv = ["bash", str(ROOT / "launch" / "torchrun.sh"), str(n), *_drop_placeholders(args),
                "trainer.dry_run=true"]
        p = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or p.stdout.count("layout") < 1:
            failures.append(f"{cmd.where}\n    exit {p.returncode}: {(p.stdout + p.stderr)[-500:]}")
    for cmd in _unique(by_kind.get("hydra-cli", [])):
        argv = [sys.executable, "-c", "from oar_megatron.trainer.app import main; main()",
                *_drop_placeholders(cmd.argv[1:]), "trainer.dry_run=true"]
        p = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
        if p.returncode != 0 or not p.stdout.strip():
            failures.append(f"{cmd.where}\n    exit {p.returncode}: {p.stderr[-500:]}")
    assert not failures, "documented launcher / Hydra commands that fail:\n" + "\n".join(failures)


def _help_covers(cmd: Command, help_text: str) -> str | None:
    missing = [f for f in FLAG.findall(cmd.text) if f not in help_text and f != "--help"]
    return f"{cmd.where}\n    flags not in its --help: {missing}" if missing else None


class _Parsed(Exception):
    pass


def _synopsis_argv(args: list[str]) -> list[str]:
    """A synopsis as an argv: ``[``/``]`` dropped, ``a|b`` → ``a``, every placeholder → ``1`` (a valid int, float
    and path alike)."""
    out = []
    for a in args:
        a = a.strip("[]")
        if not a:
            continue
        a = a.split("|")[0] if "|" in a and not a.startswith("-") else a
        out.append("1" if PLACEHOLDER.search(a) else a)
    return out


def _parse_error(main, argv: list[str]) -> str | None:
    """None when ``main``'s argparse parser accepts ``argv`` (nothing is run: parsing stops the call), else why."""
    import argparse

    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    err = io.StringIO()
    try:
        argparse.ArgumentParser.parse_args = parse_only
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except _Parsed:
        return None
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else "exit"
    finally:
        argparse.ArgumentParser.parse_args = original
    return "ran without parsing"


def test_tool_commands_accept_their_flags(by_kind):
    """oar-convert subcommands (in-process) and python scripts / modules (subprocesses): --help succeeds and lists
    every documented flag; an oar-convert command with arguments also parses with oar-convert's own parser
    (placeholders as ``1``; parsing stops the call, nothing is converted)."""
    from oar_megatron.convert import cli

    failures = []
    helps: dict[tuple[str, ...], tuple[int, str]] = {}
    for cmd in by_kind.get("oar-convert", []):
        sub = cmd.argv[1]
        if (sub,) not in helps:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                try:
                    cli.main([sub, "--help"])
                    code = 0
                except SystemExit as exc:
                    code = exc.code or 0
            helps[(sub,)] = (code, buf.getvalue())
        code, text = helps[(sub,)]
        if code != 0:
            failures.append(f"{cmd.where}\n    oar-convert has no subcommand {sub!r}")
        elif (bad := _help_covers(cmd, text)) is not None:
            failures.append(bad)
        elif len(cmd.argv) > 2 and (bad := _parse_error(cli.main, _synopsis_argv(cmd.argv[1:]))) is not None:
            failures.append(f"{cmd.where}\n    does not parse as {_synopsis_argv(cmd.argv[1:])}: {bad}")
    for cmd in by_kind.get("python-help", []):
        argv = cmd.argv
        target = tuple(argv[1:3]) if argv[1] == "-m" else (argv[1],)
        if target not in helps:
            p = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, env=_env(), capture_output=True,
                               text=True, timeout=300)
            helps[target] = (p.returncode, p.stdout + p.stderr)
        code, text = helps[target]
        if code != 0:
            failures.append(f"{cmd.where}\n    --help exits {code}: {text[-300:]}")
        elif (bad := _help_covers(cmd, text)) is not None:
            failures.append(bad)
    assert not failures, "documented tool commands that do not match the tool:\n" + "\n".join(failures)


# ------------------------------------------------------------------------------------------------ the rules

EXAMPLE = """\
Run `oar-train trainer.steps=5` or `oar-convert verify HF_DIR --tp 2` (GPU-only); `oar-train` alone and
`oar-train: memory: ...` are not commands.

```bash
bash launch/setup_cpu.sh && .venv/bin/oar-train \\
    algorithm=grpo   # the second command
# a comment line
OMP_NUM_THREADS=1 A="x y" oar-train trainer.preflight=true   # GPU-only: on the cluster
```

<!-- gpu-only -->
```bash
pip install -e ".[gpu]"
```

```
oar-eval logging.run_dir=runs/x
```
"""


def test_extraction_rules():
    cmds, untagged = commands_of(EXAMPLE, "x.md")
    got = [(c.text, c.gpu_only) for c in cmds]
    assert got == [
        ("bash launch/setup_cpu.sh", False),
        (".venv/bin/oar-train algorithm=grpo", False),
        ("oar-train trainer.preflight=true", True),
        ('pip install -e ".[gpu]"', True),
        ("oar-train trainer.steps=5", False),
        ("oar-convert verify HF_DIR --tp 2", True),
    ]
    assert [c.line for c in cmds[:3]] == [5, 5, 8]
    assert untagged == ["x.md:17: oar-eval logging.run_dir=runs/x"]
    assert _drop_placeholders(["model=qwen3-8b", "model.pretrained=/path/to/Qwen3-8B", "HF_DIR", "trainer.world_size=N",
                               "<overrides>", "...", "logging.run_dir=runs/NAME", "rollout.server_urls=[http://a:1]",
                               "+experiment=qwen3-8b-oar-g"]) == [
        "model=qwen3-8b", "rollout.server_urls=[http://a:1]", "+experiment=qwen3-8b-oar-g"]
    assert kind_of(Command("x", 1, "bash launch/torchrun.sh 2 parallel=tp2", False)) == "torchrun"
    assert kind_of(Command("x", 1, "bash launch/torchrun.sh 8 parallel=tp2", False)) == "oar-train"
    assert kind_of(Command("x", 1, "bash launch/torchrun.sh NPROC ...", False)) is None
    assert kind_of(Command("x", 1, "sbatch launch/slurm.sh", False)) is None
    assert _synopsis_argv(["verify", "HF_DIR", "[--tp", "N]", "[--dtype", "fp32|bf16]"]) == [
        "verify", "1", "--tp", "1", "--dtype", "fp32"]


def test_parse_check_catches_a_wrong_synopsis():
    from oar_megatron.convert import cli

    assert _parse_error(cli.main, ["verify", "1", "--tp", "2"]) is None
    assert "--tokens" in _parse_error(cli.main, ["logprobs", "1", "--pp", "2"])
    assert "unrecognized" in _parse_error(cli.main, ["hf-to-mcore", "1", "1", "--tensor-parallel", "2"])
