"""What a model path names: an HF directory or a megatron checkpoint, resolved to the model it holds.

``resolve_model_source(path)`` → :class:`ModelSource` (no megatron import, no process group; reads ``config.json``,
``config.yaml``, ``latest`` and ``state.pt`` only):

- **HF directory**: ``config.json`` + ``*.safetensors`` (one file or sharded with ``model.safetensors.index.json``).
  Model config ``convert.config.hf_model_config(path)``; ``hf_dir = path``; ``step_dir`` None.
- **megatron checkpoint** in the trainer's format (``checkpoint/manager.py``): a checkpoint root (its ``latest``
  step is taken) or a ``step_*`` directory (holding ``state.pt``; its root is the parent).

  * a *converted* checkpoint (``oar-convert hf-to-mcore``) carries ``ROOT/hf/config.json`` (and the tokenizer
    files): model config from it, ``hf_dir = ROOT/hf``;
  * a *trainer* checkpoint has the run's ``config.yaml`` in the root's parent (``runs/NAME/checkpoints`` →
    ``runs/NAME/config.yaml``): model config = its ``model`` section; ``hf_dir`` = the run's ``model.pretrained``
    when that is an HF directory (or the HF directory of the megatron checkpoint it names), else None.

``arch`` is the mapping table name (``convert.mapping.TABLES``): from ``config.json``'s ``architectures`` when there
is one (checked against the run's model config with ``check_pretrained``), else told from the dense model config
(QK-norm → ``qwen3``, QKV bias → ``qwen2``, neither → ``llama``); None for an MoE model without an HF config.
Anything else is a one-line ``ValueError`` naming the path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..config.model import ModelConfig

__all__ = ["ModelSource", "arch_of_model", "resolve_model_source"]

HF_SUBDIR = "hf"  # a converted checkpoint's HF config.json and carried files: ROOT/hf/
RUN_CONFIG = "config.yaml"  # the trainer writes it into the run directory, the checkpoint root's parent


@dataclass(frozen=True)
class ModelSource:
    """A resolved model path (module docstring). Picklable: it travels to spawned ranks."""

    kind: str  # "hf" | "megatron"
    model: ModelConfig  # the architecture (and the run's numerics for a trainer checkpoint)
    arch: str | None  # mapping table name; None: an MoE model without an HF config.json
    hf_dir: Path | None  # where config.json / generation_config.json / tokenizer files live
    step_dir: Path | None  # the megatron step directory (kind "megatron")
    path: Path  # as given

    @property
    def root(self) -> Path | None:
        """The checkpoint root (the directory holding ``latest`` and the ``step_*`` directories)."""
        return None if self.step_dir is None else self.step_dir.parent

    @property
    def converted(self) -> bool:
        return self.kind == "megatron" and (self.root / HF_SUBDIR / "config.json").is_file()

    def with_dtype(self, params_dtype: str) -> ModelSource:
        return dataclasses.replace(self, model=dataclasses.replace(self.model, params_dtype=params_dtype))


def arch_of_model(model: ModelConfig) -> str | None:
    """The dense table a model config computes as (no HF config at hand): QK-norm → qwen3, QKV bias → qwen2,
    else llama; None for MoE (its table is not told by the config alone)."""
    if model.is_moe:
        return None
    if model.qk_layernorm:
        return "qwen3"
    return "qwen2" if model.add_qkv_bias else "llama"


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")))


def _step_dir(path: Path) -> Path | None:
    """The step directory of a checkpoint root (its ``latest``) or a step directory itself; None otherwise."""
    from ..checkpoint.manager import STATE_FILE, CheckpointError, read_latest

    if (path / STATE_FILE).is_file():
        return path
    try:
        return read_latest(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None


def resolve_model_source(path: str | Path) -> ModelSource:
    """Resolve ``path`` (an HF directory or a megatron checkpoint root / step directory); see the module docstring."""
    from .config import check_pretrained

    given = Path(path)
    if not given.exists():
        raise ValueError(f"model: {given} does not exist")
    if not given.is_dir():
        raise ValueError(f"model: {given} is not a directory (an HF model directory or a megatron checkpoint)")
    if _is_hf_dir(given):
        model, arch = _hf(given)
        return ModelSource(kind="hf", model=model, arch=arch, hf_dir=given, step_dir=None, path=given)
    step = _step_dir(given)
    if step is None:
        if (given / "config.json").is_file():
            raise ValueError(f"model: {given} has a config.json but no *.safetensors weights")
        raise ValueError(f"model: {given} is neither an HF model directory (config.json + *.safetensors) nor a "
                         f"megatron checkpoint (a step_* directory with state.pt, or a root with a 'latest' file)")
    root = step.parent
    if (root / HF_SUBDIR / "config.json").is_file():  # a converted checkpoint (oar-convert hf-to-mcore)
        hf_dir = root / HF_SUBDIR
        model, arch = _hf(hf_dir)
        return ModelSource(kind="megatron", model=model, arch=arch, hf_dir=hf_dir, step_dir=step, path=given)
    run_cfg = root.parent / RUN_CONFIG
    if not run_cfg.is_file():
        raise ValueError(f"model: {step} is a megatron checkpoint without a model description: neither "
                         f"{root / HF_SUBDIR / 'config.json'} (converted) nor the run's {run_cfg} (trainer)")
    model = _run_model(run_cfg)
    hf_dir = None
    if model.pretrained:
        pretrained = Path(model.pretrained)
        if _is_hf_dir(pretrained):
            hf_dir = pretrained
        elif pretrained.is_dir():  # a run started from a megatron checkpoint: that checkpoint's HF directory
            try:
                hf_dir = resolve_model_source(pretrained).hf_dir
            except ValueError:
                hf_dir = None
    if hf_dir is None:
        return ModelSource(kind="megatron", model=model, arch=arch_of_model(model), hf_dir=None, step_dir=step,
                           path=given)
    checked = dataclasses.replace(model, pretrained=str(hf_dir))
    try:
        arch = check_pretrained(checked)
    except ValueError as exc:
        raise ValueError(f"model: {run_cfg}: {exc}") from None
    return ModelSource(kind="megatron", model=model, arch=arch, hf_dir=hf_dir, step_dir=step, path=given)


def _hf(directory: Path) -> tuple[ModelConfig, str]:
    """(model config, table name) from ``directory/config.json``; errors name the directory."""
    from .config import architecture, hf_model_config, read_hf_config

    try:
        hf = read_hf_config(directory)
        return hf_model_config(hf), architecture(hf)
    except ValueError as exc:
        raise ValueError(f"model: {directory}: {exc}") from None


def _run_model(run_cfg: Path) -> ModelConfig:
    """The ``model`` section of a run's ``config.yaml`` as a validated :class:`ModelConfig`."""
    from omegaconf import OmegaConf

    from ..config.train import train_config_from

    try:
        cfg = train_config_from(OmegaConf.load(run_cfg))
    except ValueError as exc:
        raise ValueError(f"model: {run_cfg}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml / OS errors, reported in one line
        raise ValueError(f"model: {run_cfg}: cannot read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    try:
        return cfg.model.validate()
    except ValueError as exc:
        raise ValueError(f"model: {run_cfg}: {exc}") from None
