"""The survival ladder: edits checked at every quantization rung, in the runtime each format runs in."""
from qedit.survival.gate import Requirement, check_requirements, parse_requirement
from qedit.survival.ladder import SurvivalConfig, SurvivalResult, run_survival
from qedit.survival.rungs import DEFAULT_LADDER, Rung, RungKind, parse_ladder

__all__ = ["DEFAULT_LADDER", "Requirement", "Rung", "RungKind", "SurvivalConfig", "SurvivalResult",
           "check_requirements", "parse_ladder", "parse_requirement", "run_survival"]
