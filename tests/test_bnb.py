"""bitsandbytes runners (int8, NF4, FP4) on a tiny model: the quantized Linears, their error, and scores."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FACTS

from qedit.core.errors import QeditError

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.runtime
@pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("mode,bound", [("int8", 0.03), ("nf4", 0.15), ("fp4", 0.2)])
def test_bitsandbytes_runners(tiny_dirs, mode, bound):
    from qedit.converters.loading import load_model
    from qedit.runtimes.bnb import BitsAndBytesRunner
    from qedit.runtimes.torch_runner import TorchRunner

    loaded = load_model(tiny_dirs["llama"])
    runner = BitsAndBytesRunner(loaded, mode)
    info = runner.describe()
    assert info["runner"] == f"bitsandbytes-{mode}" and info["bitsandbytes"] and info["quantized_linears"] == "28"
    name = "model.layers.1.mlp.down_proj"
    quantized, original = runner.loaded.model.get_submodule(name), loaded.model.get_submodule(name)
    assert type(original) is torch.nn.Linear and type(quantized) is not torch.nn.Linear   # the source is untouched
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = float((quantized(x).float() - original(x)).norm() / original(x).norm())
    assert 0 < err < bound, err                       # NF4 ~0.09 and FP4 ~0.11 relative RMS (ENVIRONMENT.md)
    pairs = [(f["prompt"], f["target_new"]) for f in FACTS]
    got, full = runner.score(pairs), TorchRunner(loaded).score(pairs)
    assert all(torch.isfinite(torch.tensor(s.logprobs)).all() for s in got)
    assert [a.logprobs for a in got] != [b.logprobs for b in full]


def test_bitsandbytes_unknown_mode(tiny_dirs):
    from qedit.converters.loading import load_model
    from qedit.runtimes.bnb import BitsAndBytesRunner

    with pytest.raises(QeditError, match="mode 'int4' is unknown"):
        BitsAndBytesRunner(load_model(tiny_dirs["llama"]), "int4")
