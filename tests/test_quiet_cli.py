"""A quiet terminal: importing the command line prints nothing, other packages' warnings are off unless -v
(qedit's own stay), progress bars go to stderr, and `edit --eval` prints the generated-answer metrics."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

from qedit.cli import main, quiet_third_party


def test_importing_the_command_line_prints_nothing():
    done = subprocess.run([sys.executable, "-c", "import qedit.cli"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr[-2000:]


def test_third_party_warnings_are_off_unless_verbose():
    with warnings.catch_warnings(record=True) as seen:
        quiet_third_party(verbose=False)
        assert logging.getLogger("transformers").level == logging.ERROR
        assert logging.getLogger("torch.utils._pytree").level == logging.ERROR
        warnings.warn_explicit("theirs", FutureWarning, "x.py", 1, module="transformers.generation")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="qedit.evaluation.metrics")
        assert [str(w.message) for w in seen] == ["ours"]
        quiet_third_party(verbose=True)
        assert logging.getLogger("transformers").level == logging.WARNING
        assert logging.getLogger("qedit").getEffectiveLevel() <= logging.WARNING


def test_edit_eval_prints_generated_metrics_and_keeps_bars_on_stderr(tiny_dirs, facts_file, tmp_path, capsys):
    metrics = tmp_path / "after.json"
    assert main(["edit", str(tiny_dirs["llama"]), str(facts_file), "-o", str(tmp_path / "out"), "--method", "rome",
                 "--stats-samples", "16", "--eval", "--json", str(metrics)]) == 0
    out, err = capsys.readouterr()
    assert "efficacy_gen=" in out and "locality_gen=" in out, out
    assert "\r" not in out and "it/s" not in out and "%|" not in out          # progress bars: stderr only
    case = json.loads(metrics.read_text())["cases"][0]
    assert isinstance(case["continuation"], str) and case["efficacy_gen"] in (0.0, 1.0)
