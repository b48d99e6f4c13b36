"""Distributed plumbing for Scion: who holds which slice of which parameter, who orthogonalises each
matrix, and the collectives that move fragments there and back. No formula of Scion lives here (the
mathematics is :mod:`disco_ds.optim.norms`), and nothing here imports DeepSpeed at import time.

* :mod:`.layout`: :class:`Fragment` and :class:`Layout`, the parameter-layout objects.
* :mod:`.providers`: one provider per way parameters are held (replicated, ZeRO-1/2, ZeRO-3, the
  tensor-parallel lift), each building its groups' layouts and running their self-tests.
* :mod:`.exchange`: the distributed LMO (owners, rounds, ``all_to_all_single``, partial sums).
* :mod:`.tensor_parallel`: NormGPT's AutoTP plan and the TP×DP lift of layouts.
* :mod:`.agreement`: checks agreed over the group before anyone raises; clean shutdown.
* :mod:`.timing`: counters and CUDA-event timers of the step.
"""

from disco_ds.distributed.agreement import (
    FAULT_ENV,
    RankCheckError,
    accelerator_device,
    injected_fault,
    raise_if_any_failed,
    shutdown_and_exit,
)
from disco_ds.distributed.exchange import assign_owners, distributed_lmo, matrix_products, plan_rounds
from disco_ds.distributed.layout import Fragment, Layout, logical_shape, matrix_view_shape
from disco_ds.distributed.providers import (
    LayoutProvider,
    Placement,
    choose_provider,
    replicated_layout,
    zero3_layout,
    zero3_sub_group,
    zero12_layout,
)
from disco_ds.distributed.timing import ExchangeStats, Stopwatch

__all__ = [
    "Fragment",
    "Layout",
    "LayoutProvider",
    "Placement",
    "choose_provider",
    "zero12_layout",
    "zero3_layout",
    "zero3_sub_group",
    "replicated_layout",
    "assign_owners",
    "plan_rounds",
    "distributed_lmo",
    "matrix_products",
    "matrix_view_shape",
    "ExchangeStats",
    "Stopwatch",
    "RankCheckError",
    "raise_if_any_failed",
    "injected_fault",
    "FAULT_ENV",
    "shutdown_and_exit",
    "logical_shape",
    "accelerator_device",
]
