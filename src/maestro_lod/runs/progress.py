"""Console feedback: a tqdm bar per epoch (loss, accuracy, total rank) and one log line per epoch."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from ..training.loop import Callback, Trainer


def epoch_line(record: dict[str, Any], epochs: int, dense_params: int, dense_macs: int) -> str:
    """``epoch 3/30  loss 0.912  val acc 95.10%  total rank 152  params 0.51x  MACs 1.05x  1.2s``."""
    quality = f"val acc {100 * record['val_accuracy']:.2f}%"
    if "val_perplexity" in record:
        quality += f"  val ppl {record['val_perplexity']:.3f}"
    return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  {quality}  "
            f"total rank {record['total_rank']}  params {record['params'] / dense_params:.2f}x  "
            f"MACs {record['macs'] / max(dense_macs, 1):.2f}x  {record['epoch_time']:.1f}s")


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (a log file or a pipe is not: no bars there)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress(Callback):
    """Prints a line per epoch to ``stream``; with ``bars=True`` also a tqdm bar over each epoch's steps
    (on stderr, when it is a terminal: a redirected log gets the epoch lines only), showing the
    running loss, accuracy and total rank."""

    main_only = True  # a distributed run writes and prints on rank 0 only

    def __init__(self, bars: bool = True, stream: TextIO | None = None, prefix: str = ""):
        self.bars = bars
        self.stream = stream
        self.prefix = prefix
        self._bar: tqdm | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.bars and is_terminal(sys.stderr):
            self._bar = tqdm(total=len(trainer.train_loader), desc=f"{self.prefix}epoch {epoch}/{trainer.config.epochs}",
                             leave=False, dynamic_ncols=True, file=sys.stderr)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{100 * metrics['accuracy']:.1f}%",
                                  rank=metrics["total_rank"], refresh=False)
            self._bar.update(1)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        line = self.prefix + epoch_line(record, trainer.config.epochs, trainer.dense_params, trainer.dense_macs)
        print(line, file=self.stream or sys.stdout, flush=True)
