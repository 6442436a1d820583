"""``oar-convert verify HF_DIR [--tp N] [--pp N] [--ep N] [--dtype fp32|bf16] [--tol X]``: check a conversion end to
end on this machine.

1. Conversion into a temporary directory (removed at the end), or ``--mcore CKPT_DIR``: an existing megatron
   checkpoint (converted, or a run's) checked against HF_DIR instead. The conversion is ``oar-convert hf-to-mcore``
   under the layout being checked (``_megatron_source``); the ranks then load that checkpoint.
2. A few fixed random token sequences (seeded; lengths differ, so padding is exercised) go through the megatron
   policy under the layout (``logprobs.policy_outputs`` on tp·pp·ep local ranks: the trainer's π_old log-probs and
   the vocab-gathered logits) and through ``transformers.AutoModelForCausalLM`` (fp32, eval, one sequence at a time:
   no padding on the HF side).
3. Printed: max |Δlogit| over every position (logits, not log-probs: the stricter of the two, as log-probs cancel a
   shared offset), max |Δlogprob| of the scored tokens, top-1 (argmax) agreement over every position, and the round
   trip: the loaded megatron parameters exported with ``mcore_to_hf`` equal the HF tensors bit for bit (each HF
   tensor rounded to the parameters' dtype), or the first tensor that differs.

Passes (exit 0) when max |Δlogit| and max |Δlogprob| are within ``--tol`` (default 1e-4 in fp32; 0.25 in bf16,
where the comparison is a smoke check against an fp32 HF model) and the round trip is identical; else exit 1.
Top-1 agreement is reported, not required (a near-tie may flip under any rounding).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .source import ModelSource, resolve_model_source

__all__ = ["VerifyResult", "default_tol", "verify", "verify_sequences"]

DEFAULT_TOL = {"fp32": 1e-4, "bf16": 0.25}


def default_tol(dtype: str) -> float:
    return DEFAULT_TOL[dtype]


@dataclass
class VerifyResult:
    max_dlogit: float
    max_dlogprob: float
    top1: float  # fraction of positions whose argmax agrees
    positions: int
    round_trip: bool | None  # None: not checked under this layout
    first_diff: str | None
    tensors: int
    tol: float
    route: str

    @property
    def passed(self) -> bool:
        return self.max_dlogit <= self.tol and self.max_dlogprob <= self.tol and self.round_trip is not False

    def lines(self) -> list[str]:
        if self.round_trip is None:
            rt = f"not checked ({self.first_diff})"
        elif self.round_trip:
            rt = f"bit-identical ({self.tensors} tensors)"
        else:
            rt = f"DIFFERS, first: {self.first_diff}"
        return [f"  megatron side: {self.route}",
                f"  max |Δlogit|   {self.max_dlogit:.3e}  (tol {self.tol:g})",
                f"  max |Δlogprob| {self.max_dlogprob:.3e}  (tol {self.tol:g})",
                f"  top-1 agreement {100 * self.top1:.1f}% of {self.positions} positions",
                f"  round trip (mcore_to_hf of the loaded parameters vs the HF tensors): {rt}",
                "PASS" if self.passed else "FAIL"]


def verify_sequences(model, num: int = 4, length: int = 16, seed: int = 0) -> list[list[int]]:
    """``num`` fixed random sequences (ids in the vocabulary), lengths ``length`` down to ~length/3, capped by the
    model's ``max_position_embeddings``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    top = max(2, min(length, model.max_position_embeddings))
    lengths = [max(2, top - (i * top) // (max(num, 1) + 1)) for i in range(num)]
    return [torch.randint(0, model.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _megatron_source(source: ModelSource, tmp: Path, *, tp: int, pp: int, ep: int, dtype: str,
                     quiet: bool) -> tuple[ModelSource, str]:
    """The megatron side of the check: ``oar-convert hf-to-mcore`` of the HF directory into ``tmp / "mcore"``
    under the layout being checked (a converted checkpoint: its ranks stream their shards into megatron models and
    save them with dist-checkpointing), then that checkpoint as the source (weights through
    ``CheckpointManager.load``), so the whole path a user takes — convert, load, compute, export — is checked."""
    from .checkpoint import hf_to_mcore_checkpoint

    out = tmp / "mcore"
    hf_to_mcore_checkpoint(source.hf_dir, out, tp=tp, pp=pp, ep=ep, dtype=dtype, quiet=quiet)
    return resolve_model_source(out), f"hf-to-mcore into {out} (tp={tp} pp={pp} ep={ep}), loaded by CheckpointManager"


def _same_architecture(hf: ModelSource, mcore: ModelSource) -> None:
    """``--mcore``'s model must compute as the HF directory's (``convert.config.check_pretrained``)."""
    from .config import check_pretrained

    try:
        check_pretrained(dataclasses.replace(mcore.model, pretrained=str(hf.hf_dir)))
    except ValueError as exc:
        raise ValueError(f"--mcore: {mcore.path}: {str(exc).removeprefix('model.pretrained: ')}") from None


def _hf_logits(hf_dir: Path, sequences: list[list[int]]):
    """``transformers`` logits [L, V] (fp32, eval) of each sequence, one at a time (no padding)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([s])).logits[0].float() for s in sequences]


def verify(hf_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, dtype: str = "fp32",
           tol: float | None = None, num: int = 4, length: int = 16, seed: int = 0, mcore: str | Path | None = None,
           timeout: float = 3600.0, echo=print) -> VerifyResult:
    """Run the check (module docstring), print its lines with ``echo`` and return the result. ``mcore``: check
    this existing megatron checkpoint (converted, or a trainer checkpoint) against ``hf_dir`` instead of converting
    (e.g. a run's checkpoint against its ``mcore-to-hf`` export)."""
    import torch

    from .launch import run_local
    from .logprobs import DTYPES, policy_outputs, supported_layout

    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown {dtype!r}; known: {', '.join(DTYPES)}")
    source = resolve_model_source(hf_dir)
    if source.kind != "hf":
        raise ValueError(f"HF_DIR: {hf_dir} is a megatron checkpoint; verify checks an HF directory's conversion")
    tol = default_tol(dtype) if tol is None else float(tol)
    seqs = verify_sequences(source.model, num, length, seed)
    echo(f"oar-convert verify {hf_dir} ({source.arch}, tp={tp} pp={pp} ep={ep}, {dtype}, {len(seqs)} sequences of "
         f"{', '.join(str(len(s)) for s in seqs)} tokens)")
    with tempfile.TemporaryDirectory(prefix="oar-verify-") as tmp:
        if mcore is None:
            mcore, route = _megatron_source(source, Path(tmp), tp=tp, pp=pp, ep=ep, dtype=dtype, quiet=True)
        else:
            mcore = resolve_model_source(mcore)
            route = f"the megatron checkpoint {mcore.step_dir} (CheckpointManager.load)"
            if mcore.kind != "megatron":
                raise ValueError(f"--mcore: {mcore.path} is not a megatron checkpoint")
            _same_architecture(source, mcore)
            mcore = dataclasses.replace(mcore, arch=source.arch)  # HF_DIR's table names the export
        mcore = mcore.with_dtype(DTYPES[dtype])
        supported_layout(mcore, tp=tp, pp=pp, ep=ep)
        got = run_local(policy_outputs, tp * pp * ep, mcore, seqs, (tp, pp, ep), ("logprobs", "logits", "export"),
                        str(source.hf_dir), timeout=timeout)
    want = _hf_logits(source.hf_dir, seqs)
    dlogit = dlogp = 0.0
    agree = positions = 0
    for s, ref, logits, logp in zip(seqs, want, got["logits"], got["logprobs"], strict=True):
        logits = logits.float()
        dlogit = max(dlogit, (logits - ref).abs().max().item())
        ref_logp = torch.log_softmax(ref.double(), -1)[:-1].gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
        dlogp = max(dlogp, (torch.tensor(logp, dtype=torch.float64) - ref_logp).abs().max().item())
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        positions += len(s)
    if math.isnan(dlogit) or math.isnan(dlogp):
        dlogit = dlogp = math.inf
    ex = got["export"]
    res = VerifyResult(max_dlogit=dlogit, max_dlogprob=dlogp, top1=agree / positions, positions=positions,
                       round_trip=ex["identical"], first_diff=ex["first_diff"], tensors=ex["tensors"], tol=tol,
                       route=route)
    for line in res.lines():
        echo(line)
    return res
