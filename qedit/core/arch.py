"""Architecture as data: one `ArchSpec` per model family.

Each spec declares where the edit targets live (the MLP output projection of every decoder
layer), how their weights are oriented, and which layers are edited by default. Nothing here is
guessed from tensor shapes: an architecture without a spec is refused with a clear error.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from qedit.core.errors import QeditError


class Orientation(str, enum.Enum):
    """How a weight is stored relative to the math y = W x.

    OUT_IN: stored as (out_features, in_features), like torch.nn.Linear.
    IN_OUT: stored as (in_features, out_features), like GPT-2's Conv1D.
    """

    OUT_IN = "out_in"
    IN_OUT = "in_out"


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one model family (HF module paths; `{}` is the layer index)."""

    name: str                       # our family name
    model_types: tuple[str, ...]    # HF config.model_type values this spec covers
    gguf_arch: str                  # general.architecture in GGUF files
    base_model: str                 # attribute holding the decoder stack (returns final-normed hidden)
    lm_head: str                    # output projection module
    layer: str                      # decoder layer module; its output is the residual stream
    mlp_out: str                    # the edit target: MLP down/out projection; its input is the key
    mlp_out_orientation: Orientation
    mlp_out_norm: str | None        # norm applied to the MLP output before the residual add, if any
    n_layers_attr: str              # config attribute with the number of decoder layers
    rome_layer_frac: float          # default single edit layer, as a fraction of depth
    memit_layer_fracs: tuple[float, ...]  # default multi-layer span, as fractions of depth
    # config attribute by which the (normed) MLP output is multiplied before the residual add (Granite's
    # residual_multiplier), if any
    mlp_out_scale: str | None = None

    def __post_init__(self) -> None:
        for field_name in ("layer", "mlp_out"):
            if "{}" not in getattr(self, field_name):
                raise ValueError(f"ArchSpec {self.name}: {field_name} template needs a '{{}}' for the layer")
        if not 0.0 <= self.rome_layer_frac < 1.0:
            raise ValueError(f"ArchSpec {self.name}: rome_layer_frac must be in [0, 1)")

    def module_name(self, template: str, layer: int) -> str:
        return template.format(layer)

    def weight_name(self, layer: int) -> str:
        """HF state-dict name of the edit-target weight at `layer`."""
        return self.mlp_out.format(layer) + ".weight"

    def default_layers(self, n_layers: int, multi: bool) -> tuple[int, ...]:
        """Default edit layers for a model of `n_layers` decoder layers."""
        if not multi:
            return (min(n_layers - 1, int(round(self.rome_layer_frac * n_layers))),)
        layers = sorted({min(n_layers - 1, int(round(f * n_layers))) for f in self.memit_layer_fracs})
        return tuple(layers)


_GATED = dict(
    base_model="model",
    lm_head="lm_head",
    layer="model.layers.{}",
    mlp_out="model.layers.{}.mlp.down_proj",
    mlp_out_orientation=Orientation.OUT_IN,
    n_layers_attr="num_hidden_layers",
)

_DENSE = dict(rome_layer_frac=0.16, memit_layer_fracs=(0.12, 0.16, 0.2, 0.25))
_GEMMA = dict(rome_layer_frac=0.33, memit_layer_fracs=(0.22, 0.28, 0.33, 0.39))
_POST_FFW_NORM = "model.layers.{}.post_feedforward_layernorm"

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(name="llama", model_types=("llama", "mistral"), gguf_arch="llama", mlp_out_norm=None, **_DENSE, **_GATED),
    ArchSpec(name="qwen2", model_types=("qwen2",), gguf_arch="qwen2", mlp_out_norm=None, **_DENSE, **_GATED),
    ArchSpec(name="qwen3", model_types=("qwen3",), gguf_arch="qwen3", mlp_out_norm=None, **_DENSE, **_GATED),
    ArchSpec(name="gemma2", model_types=("gemma2",), gguf_arch="gemma2", mlp_out_norm=_POST_FFW_NORM, **_GEMMA,
             **_GATED),
    ArchSpec(name="gemma3", model_types=("gemma3_text", "gemma3"), gguf_arch="gemma3", mlp_out_norm=_POST_FFW_NORM,
             **_GEMMA, **_GATED),
    # Phi-3's gate and up projections are one fused Linear (gate_up_proj); the edit target is down_proj as elsewhere
    ArchSpec(name="phi3", model_types=("phi3",), gguf_arch="phi3", mlp_out_norm=None, **_DENSE, **_GATED),
    ArchSpec(name="smollm3", model_types=("smollm3",), gguf_arch="smollm3", mlp_out_norm=None, **_DENSE, **_GATED),
    ArchSpec(name="granite", model_types=("granite",), gguf_arch="granite", mlp_out_norm=None,
             mlp_out_scale="residual_multiplier", **_DENSE, **_GATED),
    # OLMo 2 normalises the MLP output (post_feedforward_layernorm) before the residual add
    ArchSpec(name="olmo2", model_types=("olmo2",), gguf_arch="olmo2", mlp_out_norm=_POST_FFW_NORM, **_DENSE,
             **_GATED),
    ArchSpec(name="gpt2", model_types=("gpt2",), gguf_arch="gpt2", base_model="transformer", lm_head="lm_head",
             layer="transformer.h.{}",
             mlp_out="transformer.h.{}.mlp.c_proj", mlp_out_orientation=Orientation.IN_OUT, mlp_out_norm=None,
             n_layers_attr="n_layer", rome_layer_frac=0.35, memit_layer_fracs=(0.27, 0.31, 0.35)),
)

# HF model types whose MLPs are routed experts: qedit edits one dense MLP down-projection per layer
MOE_MODEL_TYPES = frozenset({
    "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "gpt_oss", "olmoe", "granitemoe", "granitemoehybrid",
    "phimoe", "deepseek_v2", "deepseek_v3", "dbrx", "jamba", "llama4", "llama4_text", "dots1", "ernie4_5_moe",
    "hunyuan_v1_moe", "glm4_moe", "minimax", "switch_transformers", "nllb_moe",
})


def supported_model_types() -> list[str]:
    return sorted({t for spec in ARCHS for t in spec.model_types})


def arch_for_model_type(model_type: str, source: str = "model") -> ArchSpec:
    """The spec for an HF `config.model_type`, or a QeditError listing the supported ones."""
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    if model_type in MOE_MODEL_TYPES:
        raise QeditError(
            f"{source}: {model_type!r} is a mixture-of-experts model: qedit edits the dense MLP down-projection, "
            f"which this model replaces with routed experts; supported: {', '.join(supported_model_types())}"
        )
    raise QeditError(
        f"{source}: architecture {model_type!r} is not supported; "
        f"supported: {', '.join(supported_model_types())}"
    )


def arch_for_gguf(gguf_arch: str, source: str = "model") -> ArchSpec:
    for spec in ARCHS:
        if spec.gguf_arch == gguf_arch:
            return spec
    raise QeditError(
        f"{source}: GGUF architecture {gguf_arch!r} is not supported; "
        f"supported: {', '.join(sorted(s.gguf_arch for s in ARCHS))}"
    )
