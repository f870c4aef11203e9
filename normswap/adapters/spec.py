"""The declarative description of one architecture: which modules write the residual stream and which norms read it.

An adapter is pure data. The conversion algorithm in :mod:`normswap.surgery` reads it and never branches on model
names, so supporting a new architecture means writing one :class:`Adapter` entry (and one test row).

Paths are dotted module paths relative to the *base model* (``model.base_model``, e.g. ``transformer`` inside
``GPT2LMHeadModel``) unless they are listed under ``heads``, which are relative to the top-level model. Block-level
paths are relative to each block of the ``blocks`` ModuleList.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: How a writer's tensor is laid out, which decides the axis that indexes the hidden (residual) dimension.
#: ``linear``: nn.Linear weight [out=hidden, in]; ``conv1d``: GPT-2 Conv1D weight [in, out=hidden];
#: ``embedding``: nn.Embedding weight [rows, hidden]; ``conv2d``: Conv2d weight [out=hidden, in, k, k];
#: ``param``: a bare parameter [..., hidden] (ViT cls/position/mask tokens); ``conv``: any ConvNd weight
#: [out=hidden, in, *k] (Conv1d/Conv3d stems); ``recenter``: a *nonlinear* writer (CLIP's ``pre_layrnorm``, Whisper's
#: GELU conv stem, sinusoidal positions kept in a non-persistent buffer) whose weights cannot make its output
#: zero-mean: its output is re-centred at run time (``normswap.load`` and the remote code install the re-centring;
#: the stock keys are kept, so the stock class, whose LayerNorms ignore the mean, still loads the checkpoint);
#: ``recenter_input``: the stream is produced by functional code with no module of its own (Whisper's encoder adds
#: ``gelu(conv2(...))`` and the positions inline): the *first input* of the module at ``path`` (``layers.0``) is
#: re-centred at run time instead. A block writer whose path is ``''`` is the block itself: ``Writer('',
#: 'recenter_input')`` re-centres the input of every block (a conformer's blocks end in a norm whose output is the next
#: block's stream, and the last block's is the model output, which must stay as it was).
Layout = Literal["linear", "conv1d", "embedding", "conv2d", "conv", "param", "recenter", "recenter_input"]


@dataclass(frozen=True)
class Writer:
    """A module (or bare parameter) whose output is added into the residual stream."""

    path: str
    layout: Layout = "linear"
    #: Absent in some configurations (OPT ``project_in``, ViT ``mask_token``); skipped when missing.
    optional: bool = False
    #: Not a writer when this other module exists (OPT: ``embed_tokens`` feeds ``project_in`` when it exists).
    unless_present: str | None = None
    #: An elementwise scale applied to this writer's output before it joins the stream (LayerScale: DINOv2
    #: ``layer_scale1.lambda1``, BEiT ``lambda_1``), same root as ``path``. It is folded into the writer (rows and
    #: bias scaled) before centring, and the scale parameter is then set to ones so the stock keys stay.
    scale: str | None = None


@dataclass(frozen=True)
class Norm:
    """A LayerNorm that normswap swaps for RMSNorm."""

    path: str
    #: Modules that consume this norm's output (for ``--fold-gain`` / ``--fold-bias``); empty = output leaves the
    #: model or goes somewhere we cannot fold into.
    readers: tuple[str, ...] = ()
    #: Layout of the readers' weights (same meaning as :data:`Layout`; only ``linear`` and ``conv1d`` fold).
    reader_layout: Layout = "linear"
    #: Reads a sum of centred writers (pre-LN). False: reads something that is not zero-mean (post-LN), so the
    #: swap can only be approximate.
    exact: bool = True
    #: Its output is added to the residual stream (BLOOM's embedding norm): swapped for a re-centring RMSNorm.
    writes_stream: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Stack:
    """A further ModuleList of blocks (an encoder-decoder's second stack, a Swin stage), base-model relative."""

    blocks: str
    block_writers: tuple[Writer, ...] = ()
    block_norms: tuple[Norm, ...] = ()
    #: Absent from some classes of the model type (WhisperForCausalLM has no encoder, CLIPForImageClassification no
    #: text tower); skipped when missing.
    optional: bool = False


@dataclass(frozen=True)
class PostLNCondition:
    """A config setting under which the architecture is post-LN (or otherwise not exact)."""

    attribute: str
    value: object
    reason: str


@dataclass(frozen=True)
class Adapter:
    """Where the writers and norms are for one ``model_type``."""

    model_type: str
    #: ModuleList of transformer blocks, relative to the base model ('' when every role is listed in full under
    #: ``embeddings``/``other_norms`` or ``stacks``).
    blocks: str
    #: Writers outside the blocks (embeddings, position embeddings, input projections), base-model relative.
    embeddings: tuple[Writer, ...] = ()
    #: Writers inside each block, block relative.
    block_writers: tuple[Writer, ...] = ()
    #: Norms inside each block, block relative.
    block_norms: tuple[Norm, ...] = ()
    #: Norms outside the blocks (final norm, embedding norm), base-model relative.
    other_norms: tuple[Norm, ...] = ()
    #: Modules relative to the top-level model (lm_head, classifier), used as fold readers by ``other_norms``.
    heads: tuple[str, ...] = ()
    #: Norms that deliberately stay LayerNorm because they do not read the stream (documentation + inspect output).
    kept_norms: tuple[str, ...] = ()
    #: "sequential" (attn then mlp, one norm each) or "parallel" (attn and mlp read the same stream).
    block_style: Literal["sequential", "parallel", "sequential or parallel"] = "sequential"
    #: "pre" (norms read the stream: exact) or "post" (norms read stream + sublayer output: approximate).
    norm_position: Literal["pre", "post"] = "pre"
    #: Config settings that make this architecture post-LN; exact conversion refuses them.
    post_ln_when: tuple[PostLNCondition, ...] = ()
    #: On-disk key aliases (streaming conversion): {name in the loaded model: name in the file}. Keys are whole dotted
    #: names or fragments of them (matched on whole components, one pass), e.g. ViT's {"layers": "encoder.layer"}.
    disk_aliases: dict[str, str] = field(default_factory=dict)
    notes: str = ""
    #: More block stacks (Whisper's decoder next to its encoder, Swin's stages), each resolved like ``blocks``.
    stacks: tuple[Stack, ...] = ()
    #: Why each kept norm stays LayerNorm ({pattern in ``kept_norms``: reason}), e.g. a raw reader of its stream.
    kept_reasons: dict[str, str] = field(default_factory=dict)
    #: Output fields that *are* the residual stream (CLIP vision ``last_hidden_state``, ``hidden_states``): after an
    #: exact conversion they come back mean-removed; the report and card name them.
    raw_stream_outputs: tuple[str, ...] = ()
    #: Axis of the hidden dimension in the stream between blocks and in ``raw_stream_outputs``: the last (-1), or 1
    #: for a model that keeps its stream channels-first between blocks (VitDet: [batch, hidden, h, w]).
    stream_axis: int = -1
    #: "declared" (a reviewed entry in architectures.py) or "discovered" (measured by normswap.discovery).
    origin: Literal["declared", "discovered"] = "declared"

    def config_reasons(self, config: object) -> list[str]:
        """Config settings that make *every* norm of this model inexact (e.g. OPT with do_layer_norm_before=False)."""
        return [c.reason for c in self.post_ln_when if getattr(config, c.attribute, None) == c.value]

    def post_ln_reasons(self, config: object) -> list[str]:
        """Why this particular config cannot be converted exactly (empty when it can)."""
        reasons = self.config_reasons(config)
        if self.norm_position == "post":
            reasons.insert(0, f"{self.model_type} is a post-LN architecture: its block norms read the sum of the stream "
                           "and a sublayer output, which is not zero-mean")
        return reasons
