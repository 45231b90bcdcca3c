"""Everything a training script imports from lightning_memwatch."""

from lightning_memwatch import (  # noqa: F401 (the list is the point)
    FID,  # FID settings, passed as MemWatch(fid=FID(...))
    AdaptiveSchedule,  # sparse evaluations while nothing happens, dense as memorization approaches
    EvalRecord,  # the typed record of one evaluation (MemWatch.history items)
    EvalSchedule,  # when to evaluate: every N steps, log-spaced, the paper's grid, explicit steps
    Evaluator,  # samples in, EvalRecord out, without Lightning (plain PyTorch loops)
    LossGapProbe,  # sampling-free probe: train / held-out denoising-loss gap every K steps
    MemorizationEarlyStopping,  # stop at tau_mem, keep the best weights from before the onset
    MemorizationFraction,  # torchmetrics Metric: f_mem summed over update() calls and DDP ranks
    MemorizationResult,  # what memorization_fraction returns
    MemWatch,  # the callback
    ModuleEMA,  # MemWatch(weights=ModuleEMA("ema", target="net")): score an EMA copy the module keeps
    NearestNeighbourIndex,  # exact k-NN over the training set (FAISS GPU/CPU or torch)
    TimescaleDetector,  # the tau_gen / tau_mem rules
    TimescaleEvent,  # one flag: step, rule, reason
    detect_timescales,  # the same rules over a finished history
    forecast_tau_mem,  # fit tau_mem = slope * n over runs at several n
    memorization_fraction,  # f_mem and its confidence interval for one batch of samples
    memorization_ratios,  # d1 / d2 per sample
)
from lightning_memwatch.log import F_MEM, FID_KEY, TAU_GEN, TAU_MEM  # noqa: F401 (logged keys, for monitor=...)
