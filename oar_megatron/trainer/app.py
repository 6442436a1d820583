"""Console scripts ``oar-train`` and ``oar-eval`` (Hydra applications over ``configs/config.yaml``).

    oar-train                                          # the embedded default: tiny policy, synthetic task, OAR-G
    oar-train algorithm=gspo trainer.steps=100         # any group or key, as Hydra users expect
    oar-train +experiment=qwen3-8b-oar-g trainer.dry_run=true trainer.world_size=64
    torchrun --nproc-per-node 2 -m oar_megatron.trainer.app parallel=tp2
    sbatch --nodes 8 launch/slurm.sh +experiment=qwen3-8b-oar-g trainer.preflight=true ...   # check, then exit
    oar-eval checkpoint.resume=runs/oar_g-seed0/checkpoints/step_00000060 eval.k=8 eval.ks=[1,8]

A bad config is one line on stderr naming the key (exit code 2) before any worker starts (Hydra's own composition
errors — unknown group option, unknown key, wrong type — keep Hydra's message and end with that line); ``trainer.dry_run``
prints the resolved plan (layout, batch arithmetic, memory estimate) and exits; a real run first refuses a plan
whose memory estimate exceeds the device (``plan.check_memory``); ``trainer.preflight`` runs the cluster checks of
``trainer/preflight.py`` on the real layout and exits (0: all passed, 1: the first failure, named).

The config directory is the repository's ``configs/`` (an editable install, or a checkout on ``PYTHONPATH``);
``--config-dir`` adds another, Hydra's usual way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config.train import TrainConfig, train_config_from

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def _world_size(cfg: TrainConfig) -> int:
    if cfg.trainer.world_size is not None:
        return cfg.trainer.world_size
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key):
            return int(os.environ[key])
    return 1


def _fail(msg: str) -> int:
    print(f"oar-train: {msg}", file=sys.stderr, flush=True)
    return 2


def quiet_libraries() -> None:
    """megatron-core logs every parameter name and its optimizer config at INFO, and on a machine without CUDA warns
    at import that Transformer Engine / apex are absent (they cannot exist there): keep the run's output readable."""
    import logging
    import warnings

    logging.getLogger("megatron").setLevel(logging.WARNING)
    import torch

    if not torch.cuda.is_available():
        for msg in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*Transformer Engine is not installed.*"):
            warnings.filterwarnings("ignore", message=msg)


def run_train(cfg: TrainConfig) -> int:
    """Validate, dry-run or train. Returns the process exit code."""
    from .plan import format_plan, make_plan

    try:
        plan = make_plan(cfg, _world_size(cfg))
    except ValueError as exc:
        return _fail(str(exc))
    if cfg.trainer.dry_run:
        print(format_plan(cfg, plan), flush=True)
        return 0
    if cfg.trainer.preflight:  # memory, layer spec, groups, forward/backward, checkpoint, servers; then exit
        from .preflight import run_preflight

        quiet_libraries()
        return run_preflight(cfg, plan)
    if cfg.trainer.memory_check:
        from .plan import check_memory

        try:
            check_memory(cfg, plan)  # before anything is built: an 8B model on a laptop is refused in a second
        except ValueError as exc:
            return _fail(str(exc))
    from .loop import Trainer

    quiet_libraries()
    try:
        trainer = Trainer(cfg)
    except ValueError as exc:  # data/tokenizer/reward errors found while building (before the first step)
        return _fail(str(exc))
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


def run_eval(cfg: TrainConfig) -> int:
    """Load the checkpoint named by ``checkpoint.resume`` (or the run's latest) and evaluate it."""
    from .loop import Trainer

    cfg.trainer.steps = 0
    cfg.eval.at_end = False
    cfg.eval.at_start = False
    cfg.checkpoint.save_final = False
    cfg.data.synthetic.format_warmup_steps = 0
    quiet_libraries()
    try:
        cfg.validate(_world_size(cfg))
        trainer = Trainer(cfg, evaluating=True)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        if trainer.step == 0 and cfg.checkpoint.resume != "never":
            print("oar-eval: no checkpoint found; evaluating the freshly initialised policy", file=sys.stderr)
        trainer.evaluate()
    finally:
        trainer.close()
    return 0


def register_schema() -> None:
    """``base_config`` in Hydra's ConfigStore: the schema ``configs/config.yaml`` starts its defaults list with."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=TrainConfig)


def _type_name(tp) -> str:
    """``int`` → "int", ``int | None`` → "int or null", ``list[str]`` → "list[str]"."""
    import types
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if args:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def hydra_error_line(exc: BaseException | None) -> str | None:
    """The one line a user needs after Hydra's own message for a composition error ``exc``: which option or key is
    wrong and what is accepted (group options, the expected type, the nearest known key). None: not a Hydra error."""
    import dataclasses
    import difflib
    import typing

    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    while exc is not None and not isinstance(exc, HydraException):
        exc = exc.__context__
    if exc is None:
        return None
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and "/" in exc.missing_cfg_file:
        group, name = exc.missing_cfg_file.rsplit("/", 1)
        return f"{group}={name}: unknown option; available: {', '.join(exc.options or [])}"
    if isinstance(exc, OverrideParseException):
        return (f"{exc.override}: not an override; write key=value (trainer.steps=10) or group=option "
                f"(model=tiny)")
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    owner = getattr(cause, "object_type", None)
    if key and dataclasses.is_dataclass(owner):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        fields = [f.name for f in dataclasses.fields(owner)]
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            near = difflib.get_close_matches(cause.key, fields, n=1)
            if near:
                return f"{key}: unknown key; did you mean {parent + '.' if parent else ''}{near[0]}?"
            return f"{key}: unknown key; {parent or 'the config'} has: {', '.join(fields)}"
        if isinstance(cause, ValidationError) and cause.key in fields:
            expected = typing.get_type_hints(owner)[cause.key]
            return f"{key}={cause.value}: expects {_type_name(expected)}"
    if key:
        return f"{key}: {str(cause).splitlines()[0]}"
    return f"config: {str(exc).splitlines()[0]}"


def _hydra_entry(runner) -> int:
    import hydra
    from omegaconf import DictConfig

    register_schema()
    code = {"rc": 0, "entered": False}

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _main(raw: DictConfig) -> None:
        code["entered"] = True
        try:
            cfg = train_config_from(raw)
        except ValueError as exc:
            code["rc"] = _fail(str(exc))
            return
        code["rc"] = runner(cfg)

    try:
        _main()
    except SystemExit as exc:
        # Hydra printed its message (with provider paths) and exits 1: add the line a user needs, exit 2 as every
        # other configuration error does. exc.__context__ is the exception Hydra was reporting.
        line = None if code["entered"] or exc.code in (0, None) else hydra_error_line(exc.__context__)
        if line is None:
            raise
        return _fail(line)
    return code["rc"]


def main() -> None:
    sys.exit(_hydra_entry(run_train))


def eval_main() -> None:
    sys.exit(_hydra_entry(run_eval))


if __name__ == "__main__":
    main()
