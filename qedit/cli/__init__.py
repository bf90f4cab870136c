"""The `qedit` command line: `main` parses, builds typed jobs (`args`), calls the pipeline and prints.

Importing it quiets what third-party packages log while qedit's modules import them (before `main` has
parsed -v): transformers imports torchao when it is installed (gptqmodel pulls it in), and torchao logs
"Failed to load ..." for its CUDA-only kernels and makes torch's pytree warn about deprecated Enum
registrations. `main` then sets the level for the whole run (`quiet_third_party`)."""
from __future__ import annotations

import logging
import sys
import warnings

# Loggers of other packages: off (errors only) unless -v. llama_cpp.native is llama.cpp's own log
# (qedit.runtimes.llama routes it there). torch and transformers set their top logger's level when they are
# imported, so the pytree logger is named on its own.
THIRD_PARTY_LOGGERS = ("torchao", "torch", "torch.utils._pytree", "transformers", "accelerate", "gptqmodel",
                       "bitsandbytes", "optimum", "llama_cpp", "llama-cpp-python", "urllib3", "filelock",
                       "huggingface_hub", "datasets")


def quiet_third_party(verbose: bool) -> None:
    """Without `verbose`: other packages log errors only and their Python warnings are dropped; qedit's own
    warnings (logger "qedit", warnings raised from qedit's modules) are kept. With it: their warnings too."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"qedit(\.|$)")


quiet_third_party(verbose=bool({"-v", "--verbose"} & set(sys.argv[1:])))

from qedit.cli.app import main  # noqa: E402  (after the quieting above: app imports transformers)

__all__ = ["main", "quiet_third_party"]
