"""Pipeline layouts in oar_megatron.convert without megatron: HF → one model chunk per (stage, virtual stage) with
megatron's stage-local layer names, the embedding on the first chunk, norm / head on the last, the tied embedding's
copy on the last chunk; every chunk reads only its own HF tensors; all chunks × TP ranks → HF bit-identical."""

import json

import pytest
import torch
from safetensors.torch import load_file

from oar_megatron.convert import hf_model_config, hf_to_mcore, mcore_to_hf
from oar_megatron.convert.mapping import pipeline_states
from oar_megatron.convert.config import architecture
from oar_megatron.convert.mapping import ConversionError
from tests.convert.hf_tiny import make_hf_model

LAYOUTS = [(2, None), (2, 2), (4, None)]  # (pp, vpp) over 4 layers


@pytest.fixture(scope="module")
def hf4(tmp_path_factory):
    out = {}
    for case in ("llama3", "llama3.2", "qwen3"):
        d = tmp_path_factory.mktemp(case.replace(".", "_"))
        make_hf_model(case, d, num_hidden_layers=4)
        cfg = hf_model_config(d)
        out[case] = (cfg, architecture(json.loads((d / "config.json").read_text())),
                     load_file(str(d / "model.safetensors")))
    return out


def _chunks(pp, vpp):
    return [(p, v) for v in ([None] if vpp is None else range(vpp)) for p in range(pp)]  # global chunk order


class _Recording:
    """A reader (``SafetensorsReader``'s interface) that records which tensors were read."""

    def __init__(self, tensors):
        self.t, self.read = tensors, []

    def names(self):
        return list(self.t)

    def shape(self, name):
        return tuple(self.t[name].shape)

    def get(self, name):
        self.read.append(name)
        return self.t[name]


@pytest.mark.parametrize("case", ["llama3", "llama3.2", "qwen3"])
@pytest.mark.parametrize("pp,vpp", LAYOUTS)
@pytest.mark.parametrize("tp", [1, 2])
def test_chunks_round_trip_and_layout(hf4, case, pp, vpp, tp):
    cfg, arch, ref = hf4[case]
    tied = not cfg.untie_embeddings_and_output_weights
    full = [hf_to_mcore(ref, cfg, arch, tp=tp, tp_rank=r) for r in range(tp)]  # PP=1 reference, global names
    n = cfg.num_layers // (pp * (vpp or 1))
    states = {}
    for c, (p, v) in enumerate(_chunks(pp, vpp)):
        states[(p, v)] = shards = [hf_to_mcore(ref, cfg, arch, tp=tp, tp_rank=r, pp=pp, pp_rank=p, vpp=vpp,
                                               vp_stage=v) for r in range(tp)]
        first, last = c == 0, c == len(_chunks(pp, vpp)) - 1
        for r, state in enumerate(shards):
            layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
            assert layers == set(range(n))  # megatron's stage-local numbering
            assert ("embedding.word_embeddings.weight" in state) == first
            assert ("decoder.final_layernorm.weight" in state) == last
            assert ("output_layer.weight" in state) == last  # tied too: the last stage's copy of the embedding
            for k, t in state.items():  # every tensor equals the PP=1 one of its global layer
                g = k
                if k.startswith("decoder.layers."):
                    i = int(k.split(".")[2])
                    g = k.replace(f"decoder.layers.{i}.", f"decoder.layers.{c * n + i}.", 1)
                if tied and k == "output_layer.weight":
                    g = "embedding.word_embeddings.weight"
                assert torch.equal(t, full[r][g]), (k, g)
    back = dict(mcore_to_hf(pipeline_states(states), cfg, arch))
    assert set(back) == set(ref)
    for name, t in ref.items():
        assert torch.equal(back[name], t), name


def test_each_chunk_reads_only_its_tensors(hf4):
    cfg, arch, ref = hf4["llama3.2"]
    seen = []
    for p, v in _chunks(2, 2):
        src = _Recording(ref)
        hf_to_mcore(src, cfg, arch, pp=2, pp_rank=p, vpp=2, vp_stage=v)
        seen.append(src.read)
    c1 = seen[1]  # chunk 1 = stage 1, virtual stage 0: layer 1 only
    assert c1 and all(n.startswith("model.layers.1.") for n in c1)
    assert "model.embed_tokens.weight" in seen[0] and "model.norm.weight" not in seen[0]
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= set(seen[3])  # tied: the head copy
    assert sorted(n for r in seen for n in r if n.startswith("model.layers.")) == \
        sorted(n for n in ref if n.startswith("model.layers."))  # every layer read once, by one chunk


def test_pipeline_errors_are_one_line(hf4):
    cfg, arch, ref = hf4["llama3.2"]
    with pytest.raises(ConversionError, match=r"^convert: num_layers=4 does not split evenly over pp\*vpp = 3\*1"):
        hf_to_mcore(ref, cfg, arch, pp=3, pp_rank=0)
    with pytest.raises(ConversionError, match=r"^convert: num_layers=4 does not split evenly over pp\*vpp = 2\*4"):
        hf_to_mcore(ref, cfg, arch, pp=2, pp_rank=0, vpp=4, vp_stage=0)
    with pytest.raises(ConversionError, match=r"pp_rank=2 is outside pp=2"):
        hf_to_mcore(ref, cfg, arch, pp=2, pp_rank=2)
    with pytest.raises(ConversionError, match=r"vpp=2 needs pp > 1"):
        hf_to_mcore(ref, cfg, arch, pp=2, pp_rank=0, vpp=2)
    states = {(p, None): hf_to_mcore(ref, cfg, arch, pp=2, pp_rank=p) for p in range(2)}
    with pytest.raises(ConversionError, match=r"\(pp_rank, vp_stage, tp_rank, ep_rank\)=\(1, None, 0, 0\) is missing from"):
        list(mcore_to_hf(pipeline_states({(0, None): states[(0, None)], (2, None): states[(1, None)]}), cfg, arch))
    bad = {**states, (1, None): {**states[(1, None)], "output_layer.weight": states[(1, None)]["output_layer.weight"]
                                 + 1}}
    with pytest.raises(ConversionError, match=r"'output_layer.weight' of pipeline chunk .*\(1, None\) differs from"):
        list(mcore_to_hf(pipeline_states(bad), cfg, arch))
    short = {**states, (0, None): {k: t for k, t in states[(0, None)].items() if "layers.1." not in k}}
    with pytest.raises(ConversionError, match=r"'decoder.layers.1.input_layernorm.weight' missing on TP rank 0 of "
                                              r"pipeline chunk \(pp_rank, vp_stage\)=\(0, None\)"):
        list(mcore_to_hf(pipeline_states(short), cfg, arch))
