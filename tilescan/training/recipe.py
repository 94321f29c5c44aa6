"""How a model is trained: its precision, optimizer and learning-rate schedule (``[train]``
settings), made the same way for a fresh run and one that resumes."""

from __future__ import annotations

from ..backend import cpu_has_bf16
from ..config import TrainConfig


def resolve_precision(setting: str) -> str:
    """``mixed_bfloat16`` or ``float32`` for ``[train] mixed_precision``. ``auto`` trains in
    bf16 on a GPU or a CPU with native bf16 (unlike inference's ``auto``, which keeps
    float32 on GPUs: training tolerates bf16 by design, inference was measured only on CPUs)."""
    if setting == "float32":
        return "float32"
    if setting == "bf16":
        return "mixed_bfloat16"
    import keras

    from ..explain.shims import model_on_accelerator

    return "mixed_bfloat16" if model_on_accelerator(keras.backend.backend()) or cpu_has_bf16() else "float32"


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    import keras

    lr = schedule(cfg, steps_per_epoch)
    if cfg.optimizer == "adamw":
        opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
        # no decay on BatchNorm scales/offsets and biases
        opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    elif cfg.optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=lr)
    else:
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=0.9, nesterov=True)
    return opt


def schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The learning rate over ``cfg.epochs`` epochs: warm-up then cosine decay to 0, or constant."""
    import keras

    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    if cfg.schedule != "cosine":
        return cfg.learning_rate
    if warm > 0:
        return keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate * 0.01, total - warm, alpha=0.0, warmup_target=cfg.learning_rate, warmup_steps=warm)
    return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, total, alpha=0.0)


def current_lr(opt) -> float:
    """The optimizer's learning rate now (a schedule's at its step)."""
    import keras

    try:
        return float(keras.ops.convert_to_numpy(opt.learning_rate))
    except Exception:  # pragma: no cover - very old Keras
        return float("nan")
