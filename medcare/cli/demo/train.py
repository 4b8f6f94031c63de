"""One demo stage trained with :class:`~medcare.MedCareTrainer`, with a progress bar and a token count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcare.cli.demo.model import DemoSize

__all__ = ["train_stage"]


class _TokenCounter:
    """Wraps a collator and counts the real (non-padding) tokens of the batches it makes."""

    def __init__(self, collator: Any):
        self.collator = collator
        self.tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def _progress_callback(label: str) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        """One progress bar per stage with the last logged loss (and penalty) as postfix."""

        def __init__(self) -> None:
            self.bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=label, unit="step", dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and self.bar is not None:
                post = {"loss": f"{logs['loss']:.3f}"}
                if "orth_penalty" in logs:
                    post["penalty"] = f"{logs['orth_penalty']:.3g}"
                self.bar.set_postfix(post, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return StageProgress()


def train_stage(model: Any, tokenizer: Any, dataset: Any, collator: Any, output_dir: Path, label: str,
                 steps: int, lr: float, size: DemoSize, seed: int, device: str) -> dict[str, Any]:
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from medcare import MedCareTrainer

    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=size.batch_size, learning_rate=lr,
        max_steps=steps, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 12), weight_decay=0.0,
        logging_steps=max(1, steps // 24), save_strategy="no", report_to="none", seed=seed, data_seed=seed,
        use_cpu=(device == "cpu"), dataloader_num_workers=0, disable_tqdm=True)
    counter = _TokenCounter(collator)
    trainer = MedCareTrainer(model=model, args=args, train_dataset=dataset, data_collator=counter,
                             processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(label))
    result = trainer.train()
    trainer.save_model()  # the adapter (+ tokenizer, training arguments) in output_dir
    runtime = float(result.metrics.get("train_runtime") or 0.0)
    history = [{k: v for k, v in h.items() if k in ("step", "loss", "orth_penalty", "router_aux_loss")}
               for h in trainer.state.log_history if "loss" in h]
    return {"steps": int(trainer.state.global_step), "runtime_s": runtime, "tokens": counter.tokens,
            "tokens_per_s": counter.tokens / runtime if runtime > 0 else float("nan"), "history": history}
