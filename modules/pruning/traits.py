"""What each built-in pruning method reads and which per-block steps it runs: torch-free facts.

The one place for them: the registry (:mod:`modules.pruning.registry`) builds its entries
from :data:`TRAITS`, and ``topiary plan`` (:mod:`modules.engine.plan`), which imports no
torch, reads them here, with the ADMM defaults its estimate needs.
"""

from __future__ import annotations

from dataclasses import dataclass

ADMM_ITERS = 20  # ADMM's and ADMM-Grad's default iterations
ADMM_KS = 15  # ADMM-Grad re-selects its mask in the first ADMM_KS iterations
FP32_MAX_INPUTS = 1024  # ADMM precision="auto": fp32 up to this input width, mixed above


@dataclass(frozen=True)
class Traits:
    """What a method reads and which per-block steps it runs, with its default options.

    Attributes:
        needs: Statistics beyond ``sq_norm`` it always reads (``gram``, ``grad``).
        data_free: Reads no statistics at all (not even ``sq_norm``).
        selects: Its pruned weights are ``W`` off its keep-mask: a masks step, no update.
        selector: A weight update that starts from another method's keep-mask (ADMM's
            ``selector``): a masks step before the update.
    """

    needs: frozenset[str] = frozenset()
    data_free: bool = False
    selects: bool = False
    selector: bool = False

    @property
    def reads(self) -> frozenset[str]:
        """Every statistic it reads: ``sq_norm`` unless it is data-free, and :attr:`needs`."""
        return self.needs | (frozenset() if self.data_free else frozenset({"sq_norm"}))

    @property
    def masks_step(self) -> bool:
        """Whether a block's prune has a masks step (its own mask, or its selector's)."""
        return self.selects or self.selector

    @property
    def update_step(self) -> bool:
        """Whether a block's prune has an update step (a weight update)."""
        return not self.selects


TRAITS: dict[str, Traits] = {
    "magnitude": Traits(data_free=True, selects=True),
    "wanda": Traits(selects=True),
    "sparsegpt": Traits(needs=frozenset({"gram"})),
    "gblm": Traits(needs=frozenset({"grad"}), selects=True),
    "admm": Traits(needs=frozenset({"gram"}), selector=True),
    "admm-grad": Traits(needs=frozenset({"gram"})),
}
