"""The pipeline's rules, decided before any model work: which writer, which model the edit is computed on,
and whether the written file is checked in llama.cpp. No model is loaded here: the sources are stand-ins
(a file that starts with the GGUF magic, an HF directory, a GPTQ directory)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest
from qedit.kernels.gptq import GPTQConfig
from qedit.pipeline.jobs import EditJob, MethodChoice, Output
from qedit.pipeline.plan import OutputKind, edits_quantized, plan_job

REQUEST = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome", "Paris")
LLAMA = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture()
def sources(tmp_path: Path) -> dict[str, Path]:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (gptq / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128, "sym": True,
                                                           "desc_act": True, "checkpoint_format": "gptq"}))
    return {"gguf": gguf, "hf": hf, "gptq": gptq, "out": tmp_path / "out"}


def plan(source: Path, output: Output, method: str = "memit", **job):
    return plan_job(EditJob(source, [REQUEST], MethodChoice(method), output, **job))


@pytest.mark.parametrize("quant,on_quantized", [("F16", False), ("Q8_0", False), ("Q6_K", False), ("q5_k_m", False),
                                                ("Q5_K_S", False), ("Q5_0", False), ("Q4_K_M", True), ("Q4_0", True),
                                                ("Q3_K_M", True), ("Q2_K", True), ("IQ4_XS", True)])
def test_a_gguf_export_below_5_bits_computes_the_edit_on_the_quantized_model(sources, quant, on_quantized):
    assert edits_quantized(quant) is on_quantized
    p = plan(sources["gguf"], Output(sources["out"].with_suffix(".gguf"), quant=quant))
    assert p.kind is OutputKind.GGUF_EXPORT and p.on_quantized is on_quantized and p.via_base is on_quantized
    assert p.write_kind is (OutputKind.GGUF_PATCH if on_quantized else OutputKind.GGUF_EXPORT)
    naive = plan(sources["gguf"], Output(sources["out"].with_suffix(".gguf"), quant=quant, naive=True))
    assert not naive.on_quantized and naive.write_kind is OutputKind.GGUF_EXPORT and not naive.verify


@pytest.mark.parametrize("bits,on_quantized", [(2, True), (3, True), (4, True), (8, False)])
def test_a_gptq_output_patches_the_unedited_checkpoint(sources, bits, on_quantized):
    p = plan(sources["hf"], Output(sources["out"], format="gptq", gptq=GPTQConfig(bits=bits)))
    assert p.kind is OutputKind.GPTQ_WRITE and p.via_base and p.on_quantized is on_quantized
    assert p.write_kind is OutputKind.GPTQ_PATCH and not p.verify
    naive = plan(sources["hf"], Output(sources["out"], format="gptq", gptq=GPTQConfig(bits=bits), naive=True))
    assert naive.write_kind is OutputKind.GPTQ_WRITE and not naive.via_base


def test_output_kinds_follow_the_path_and_the_source(sources):
    out = sources["out"]
    assert plan(sources["gguf"], Output(out.with_suffix(".gguf"))).kind is OutputKind.GGUF_PATCH
    assert plan(sources["gguf"], Output(out.with_suffix(".gguf"), as_lora=True)).kind is OutputKind.GGUF_LORA
    assert plan(sources["gguf"], Output(out)).kind is OutputKind.HF
    assert plan(sources["gptq"], Output(out)).kind is OutputKind.GPTQ_PATCH
    assert plan(sources["gptq"], Output(out, format="hf")).kind is OutputKind.HF
    with pytest.raises(QeditError, match="a patch needs a .gguf source"):
        plan(sources["hf"], Output(out.with_suffix(".gguf")))


def test_a_saved_edit_is_never_computed_again(sources):
    from qedit.edit.compute import EditOutcome
    from qedit.edit.registry import EDIT_METHODS

    outcome = EditOutcome("memit", EDIT_METHODS.make_config("memit"), [REQUEST], [], 0.0)
    p = plan(sources["gguf"], Output(sources["out"].with_suffix(".gguf"), quant="Q2_K"), outcome=outcome)
    assert not p.on_quantized and not p.via_base


def test_the_llama_cpp_check_applies_where_it_can(sources):
    gguf, out = sources["gguf"], sources["out"].with_suffix(".gguf")
    assert plan(gguf, Output(out)).verify is LLAMA
    assert plan(gguf, Output(out, quant="Q4_K_M")).verify is LLAMA
    assert not plan(gguf, Output(out, verify=False)).verify
    assert not plan(gguf, Output(out, as_lora=True)).verify
    assert not plan(gguf, Output(out), method="kforget").verify        # unlearning is checked by --require
    with pytest.raises(QeditError, match="--verify checks a GGUF patch"):
        plan(gguf, Output(sources["out"], verify=True))
    with pytest.raises(QeditError, match="for unlearning use --require"):
        plan(gguf, Output(out, verify=True), method="kforget")


@pytest.mark.parametrize("output,message", [
    (dict(path="x.gguf", quant="Q4_K_M", as_lora=True), "exclusive"),
    (dict(path="x.gguf", format="gptq"), "--format applies to directory outputs"),
    (dict(path="x", quant="Q4_K_M"), "write a GGUF file"),
    (dict(path="x", tensor_types=(("*", "Q8_0"),)), "--tensor-type applies to GGUF outputs"),
    (dict(path="x", hold_margin=-1.0), "--hold-margin"),
    (dict(path="x", format="onnx"), "format 'onnx' is unknown"),
])
def test_bad_outputs_are_refused_before_any_work(output, message):
    with pytest.raises(QeditError, match=message):
        Output(**output)


def test_outputs_never_overwrite_inputs(sources, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("{}\n")
    with pytest.raises(QeditError, match="refusing to write the output over its own input"):
        plan(sources["gguf"], Output(sources["gguf"]))
    with pytest.raises(QeditError, match="refusing"):
        plan_job(EditJob(sources["gguf"], [REQUEST], MethodChoice("memit"), Output(facts.with_name("facts.jsonl"))),
                 [facts])
    with pytest.raises(QeditError, match="inside the model directory"):
        plan(sources["hf"], Output(sources["hf"] / "x.gguf", quant="Q8_0"))
    with pytest.raises(QeditError, match="not a GGML tensor type|TYPE one of"):
        plan(sources["gguf"], Output(sources["out"].with_suffix(".gguf"), tensor_types=(("*", "Q9_9"),)))
