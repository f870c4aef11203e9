"""What discovery returns: the adapter, every norm's verdict with its reason, and how long it took."""

from __future__ import annotations

from dataclasses import dataclass, field

from normswap.adapters.spec import Adapter
from normswap.discovery.simulate import Fix


@dataclass
class NormFinding:
    name: str
    status: str  # "exact" | "approximate" | "kept"
    reason: str = ""
    mean_ratio: float = 0.0
    writes_stream: bool = False
    readers: list[str] = field(default_factory=list)


@dataclass
class Discovery:
    """What discovery measured on one instance, and the adapter it amounts to (None: no LayerNorm-like module)."""

    model_type: str
    adapter: Adapter | None
    norms: list[NormFinding]
    rms_norms: list[str]
    writers: list[Fix]
    raw_readers: dict[str, str]
    raw_stream_outputs: list[str]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Length of every ModuleList of the instance (full names): a model whose stage lists differ in length cannot
    #: take a template measured per stage (see :func:`normswap.adapters.registry.adapter_for`).
    list_lengths: dict[str, int] = field(default_factory=dict)
    #: Mean-subtracting norms the probe pass never ran (a composite's tower the probe prompt does not reach): they
    #: are kept with :data:`normswap.discovery.norms.UNRUN_REASON`, and refuse the model when no LayerNorm ran.
    unrun_norms: list[str] = field(default_factory=list)
    #: Batch/group/instance norms by class name, so "no LayerNorm" can say what norms the model does have.
    other_norms: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> dict[str, str]:
        return {n.name: n.reason for n in self.norms if n.status == "kept"}

    @property
    def swapped(self) -> list[str]:
        return [n.name for n in self.norms if n.status != "kept"]
