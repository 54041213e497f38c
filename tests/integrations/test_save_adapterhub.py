"""save_adapterhub: adapters made or loaded by adaptkern, saved in AdapterHub's format, load into the real
``adapters`` library with the same outputs (tests/fixtures/adapterhub/saved).

The fixtures are written by this file (``python -m tests.integrations.test_save_adapterhub``, in
adaptkern's environment): for each case in ``CASES`` the adapter folder that ``save_adapterhub``
wrote and ``<case>.adaptkern.safetensors``, the model's output with the adapter. Then
``tests/fixtures/adapterhub/check_saved.py``, run in the ``adapters`` venv, loads every folder with
``model.load_adapter(path)`` and compares its outputs with adaptkern's; it records the largest
difference and a digest of the files it checked in ``saved/CHECKED.json``. Here: the saving side
reproduces the committed files, ``load_adapterhub`` round-trips them exactly, and the committed
files are the ones the library checked.
"""

import hashlib
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          RobertaConfig, RobertaModel)

from adaptkern.integrations.adapterhub import load_adapterhub
from adaptkern.integrations.adapterhub_save import save_adapterhub
from adaptkern.integrations.bottleneck_config import add_bottleneck
from adaptkern.integrations.fused_bottleneck import fused_modules
from adaptkern.integrations.patching import add_bottleneck as add_bottleneck_per_linear
from adaptkern.integrations.patching import delete_adapter
from adaptkern.testing import assert_close

from ..helpers import count_launches

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "adapterhub")
SAVED = os.path.join(FIXTURES, "saved")
ATOL = 1e-5  # as tests/integrations/test_adapterhub.py: fp32 rounding of outputs of magnitude <= 3


def _config(family):
    with open(os.path.join(FIXTURES, family, "model_config.json")) as f:
        return json.load(f)


def build(family):
    """The fixture's base model, as tests/integrations/test_adapterhub.py."""
    config_cls, model_cls = {"bert": (BertConfig, BertModel), "llama": (LlamaConfig, LlamaForCausalLM),
                             "roberta": (RobertaConfig, RobertaModel), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    model = model_cls(config_cls(**_config(family), attn_implementation="eager"))
    model.load_state_dict(load_file(os.path.join(FIXTURES, family, "base_model.safetensors")))
    return model.eval()


def run(model, family):
    inputs = load_file(os.path.join(FIXTURES, family, "inputs.safetensors"))
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return (out.last_hidden_state if family in ("bert", "roberta") else out.logits).contiguous()


def randomize(model, name, seed):
    """Seeded values for every parameter of adapter ``name`` (fresh par_bn would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".adapters.{name}." in key:
                std = 0.3 if key.endswith("weight") else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if key.endswith("scaling") else 0.0))


def _added(config, **fields):
    def make(model, name):
        torch.manual_seed(0)
        add_bottleneck(model, name, config, **fields)
        randomize(model, name, seed=len(name))
    return make


def _loaded(fixture):
    def make(model, name):
        load_adapterhub(model, os.path.join(FIXTURES, fixture), adapter_name=name)
    return make


# (family, case) -> (how the adapter is made, save as safetensors?)
CASES = {
    ("bert", "seq_bn"): (_added("seq_bn", reduction_factor=4), False),
    ("bert", "double_seq_bn"): (_added("double_seq_bn"), False),
    ("bert", "par_bn"): (_added("par_bn", mh_adapter=True, leave_out=[0]), False),
    ("bert", "scaled_par_bn_gelu"): (_added("scaled_par_bn", non_linearity="gelu", reduction_factor=8), True),
    ("bert", "seq_bn_res_after_ln"): (_added("seq_bn", reduction_factor=8, residual_before_ln=False, scaling=0.5),
                                      False),
    ("bert", "resaved_pfeiffer_no_ln_after"): (_loaded("bert/pfeiffer_no_ln_after"), False),
    ("bert", "resaved_seq_relu"): (_loaded("bert/seq_relu"), False),
    ("llama", "seq_bn"): (_added("seq_bn", reduction_factor=4, mh_adapter=True), False),
    ("llama", "double_seq_bn"): (_added("double_seq_bn", reduction_factor={"0": 4, "default": 8}), False),
    ("llama", "par_bn_gelu_new"): (_added("par_bn", reduction_factor=8, non_linearity="gelu_new"), True),
    ("llama", "resaved_houlsby_gelu"): (_loaded("llama/houlsby_gelu"), False),
    ("llama", "resaved_scaled_parallel"): (_loaded("llama/scaled_parallel"), False),
    ("roberta", "par_bn"): (_added("par_bn", reduction_factor=4, mh_adapter=True), False),
    ("qwen2", "seq_bn"): (_added("seq_bn", reduction_factor=4, mh_adapter=True), False),  # adapters hooks qwen2
}
IDS = [f"{f}-{c}" for f, c in CASES]


def make_case(family, case, directory):
    """Build the case's model, save its adapter into ``directory``; return (model, output)."""
    model = build(family)
    make, safetensors = CASES[family, case]
    make(model, case)
    save_adapterhub(model, directory, case, use_safetensors=safetensors)
    return model, run(model, family)


def digest(directory) -> str:
    """sha256 over the config file and the saved tensors (key, dtype, shape, bytes), in key order."""
    h = hashlib.sha256()
    with open(os.path.join(directory, "adapter_config.json"), "rb") as f:
        h.update(f.read())
    safe = os.path.join(directory, "adapter.safetensors")
    state = load_file(safe) if os.path.exists(safe) else torch.load(os.path.join(directory, "pytorch_adapter.bin"),
                                                                     weights_only=True)
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def write_fixtures():
    shutil.rmtree(SAVED, ignore_errors=True)
    for family, case in CASES:
        directory = os.path.join(SAVED, family, case)
        _, out = make_case(family, case, directory)
        save_file({"with_adapter": out}, os.path.join(SAVED, family, f"{case}.adaptkern.safetensors"))
        print(f"{family}/{case}: saved", file=sys.stderr)


# -- the saving side reproduces the committed files; the library checked them -----------------------------


def test_library_checked_the_committed_files():
    with open(os.path.join(SAVED, "CHECKED.json")) as f:
        checked = json.load(f)
    assert checked["versions"]["adapters"] == "1.3.0"
    assert sorted(checked["cases"]) == sorted(f"{f}/{c}" for f, c in CASES)
    for key, result in checked["cases"].items():
        assert result["digest"] == digest(os.path.join(SAVED, key)), f"{key} changed since check_saved.py ran"
        assert result["max_abs_error"] <= ATOL and result["effect"] > 1e-2, (key, result)
        assert result["missing_keys"] == [] and result["unexpected_keys"] == [], (key, result)


@pytest.mark.parametrize("family,case", list(CASES), ids=IDS)
def test_save_reproduces_fixture_and_round_trips(tmp_path, family, case):
    committed = os.path.join(SAVED, family, case)
    model, out = make_case(family, case, tmp_path / case)
    assert sorted(os.listdir(tmp_path / case)) == sorted(os.listdir(committed))
    assert digest(tmp_path / case) == digest(committed)
    with open(tmp_path / case / "adapter_config.json", "rb") as a, open(os.path.join(committed, "adapter_config.json"),
                                                                       "rb") as b:
        assert a.read() == b.read()
    recorded = load_file(os.path.join(SAVED, family, f"{case}.adaptkern.safetensors"))["with_adapter"]
    assert_close(f"{family}/{case} output", recorded, out, atol=ATOL)

    # load_adapterhub(save_adapterhub(x)): the same parameters, the same outputs, bit for bit
    again = build(family)
    with count_launches() as launches:
        load_adapterhub(again, tmp_path / case)
        out_again = run(again, family)
    assert torch.equal(out_again, out)
    fused = fused_modules(again, case)
    assert launches["_bottleneck_norm_fwd_kernel"] == len(fused), launches
    mine = {k: v for k, v in model.state_dict().items() if f".adapters.{case}." in k}
    theirs = {k: v for k, v in again.state_dict().items() if f".adapters.{case}." in k}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.adapterhub_configs[case] == model.adapterhub_configs[case]


def test_bin_is_tensors_only(tmp_path):
    """The .bin is a plain dict of tensors: torch.load(weights_only=True) reads it (as adapters does)."""
    model, _ = make_case("bert", "seq_bn", tmp_path / "a")
    state = torch.load(tmp_path / "a" / "pytorch_adapter.bin", weights_only=True)
    assert type(state) is dict and all(type(v) is torch.Tensor and v.device.type == "cpu" for v in state.values())
    assert sorted(state) == [f"encoder.layer.{i}.output.adapters.seq_bn.{p}" for i in (0, 1) for p in
                             ("adapter_down.0.bias", "adapter_down.0.weight", "adapter_up.bias", "adapter_up.weight")]
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["version"] == "adapters.1.3.0" and saved["name"] == "seq_bn" and saved["model_type"] == "bert"


# -- refusals: nothing written ------------------------------------------------------------------------


def test_refuses_adapters_without_an_adapterhub_config(tmp_path):
    model = build("llama")
    add_bottleneck_per_linear(model, "per_linear", 4, target_modules=["o_proj"])
    with pytest.raises(ValueError, match="'per_linear' has no AdapterHub config"):
        save_adapterhub(model, tmp_path / "x", "per_linear")
    assert not (tmp_path / "x").exists()


def test_refuses_a_deleted_or_broken_adapter(tmp_path):
    model = build("llama")
    load_adapterhub(model, os.path.join(FIXTURES, "llama", "houlsby_gelu"))
    delete_adapter(model, "houlsby_gelu")
    with pytest.raises(ValueError, match="has no adapter 'houlsby_gelu'"):
        save_adapterhub(model, tmp_path / "x", "houlsby_gelu")
    model = build("bert")
    add_bottleneck(model, "p", "par_bn")
    with torch.no_grad():
        model.encoder.layer[1].output.adapters["p"].up_weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in up_weight"):
        save_adapterhub(model, tmp_path / "x", "p")
    model.encoder.layer[1].output.adapters["p"].activation = "gelu"
    with pytest.raises(ValueError, match="its AdapterHub config places"):
        save_adapterhub(model, tmp_path / "x", "p")
    assert not (tmp_path / "x").exists()
    with pytest.raises(TypeError, match="path must be"):
        save_adapterhub(model, 3, "p")


def test_refuses_an_adapter_placed_where_its_config_does_not(tmp_path):
    model = build("llama")
    add_bottleneck(model, "s", "seq_bn")
    add_bottleneck_per_linear(model.model.layers[0].self_attn, "s", 4, target_modules=["o_proj"])
    with pytest.raises(ValueError, match=r"also on \['model.layers.0.self_attn.o_proj'\]"):
        save_adapterhub(model, tmp_path / "x", "s")


if __name__ == "__main__":
    write_fixtures()
