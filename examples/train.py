"""A minimal MedCare training script: what ``medcare train`` does, in one file, for any launcher.

    python  examples/train.py --stage 1 --model PATH --data train.jsonl --output_dir out/s1 [flags]
    torchrun --nproc_per_node 4 examples/train.py --stage 1 ...                      # DDP
    accelerate launch --config_file configs/fsdp2_accelerate.yaml examples/train.py ...  # FSDP2
    torchrun --nproc_per_node 4 examples/train.py ... --deepspeed configs/zero3.json    # ZeRO-3
    torchrun ... examples/train.py --stage 2 --model PATH --from_stage1 out/s1 --data align.jsonl ...

Flags: every ``transformers.TrainingArguments`` field (``--per_device_train_batch_size``, ``--fsdp``,
``--deepspeed``, ``--resume_from_checkpoint``, ...), every :class:`medcare.MedCareConfig` field
(``--r``, ``--num_experts``, ``--orth_lambda``, ...) and the script's own (:class:`ScriptArguments`).

Data: a JSON-lines file, one example per line, either ``{"input_ids": [...]}`` (``"labels"`` optional,
defaulting to the input ids) or ``{"text": "..."}`` (tokenised with the model directory's tokenizer).

Everything distributed lives in the engines and in :mod:`medcare` (``MedCareTrainer`` and the model
layer); this script has no distribution code: it is the same for one process and for N.
The ``medcare train`` command line (``medcare.cli``) is the supported entry point; this file is kept as the
smallest complete example and is what the distributed tests launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing
from collections.abc import Sequence

import torch
import transformers
from transformers import HfArgumentParser, TrainingArguments

from medcare import MedCareConfig, MedCareTrainer, apply_stage1, load_adapter, to_stage2


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass
class ScriptArguments:
    stage: int = dataclasses.field(metadata={"help": "1 (knowledge aggregation) or 2 (alignment)", "choices": [1, 2]})
    model: str = dataclasses.field(metadata={"help": "base model directory (or hub name) for from_pretrained"})
    data: str = dataclasses.field(metadata={"help": "training data, JSON lines (input_ids or text)"})
    from_stage1: str | None = dataclasses.field(default=None, metadata={
        "help": "stage 2: the stage-1 adapter directory (its output_dir or a checkpoint)"})
    max_length: int = dataclasses.field(default=1024, metadata={"help": "truncate examples to this many tokens"})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "base model dtype (float32, bfloat16)"})


def _config_flags() -> type:
    """``MedCareConfig``'s fields as a flags dataclass (tuples of names become lists for argparse)."""
    hints = typing.get_type_hints(MedCareConfig)
    fields = []
    for f in dataclasses.fields(MedCareConfig):
        tp = hints[f.name]
        if typing.get_origin(tp) is tuple:
            fields.append((f.name, list[str], dataclasses.field(default_factory=lambda d=f.default: list(d))))
        else:
            fields.append((f.name, tp, dataclasses.field(default=f.default)))
    return dataclasses.make_dataclass("MedCareFlags", fields)


class JsonlDataset(torch.utils.data.Dataset):
    def __init__(self, path: str, tokenizer, max_length: int):
        self.rows = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if "input_ids" in row:
                    ids = list(row["input_ids"])
                    labels = list(row.get("labels", ids))
                else:
                    if tokenizer is None:
                        raise ValueError(f"{path}: a 'text' example needs a tokenizer in the model directory")
                    ids = tokenizer(row["text"])["input_ids"]
                    labels = list(ids)
                self.rows.append((ids[:max_length], labels[:max_length]))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.rows[i]
        return {"input_ids": ids, "labels": labels}


def collate(pad_id: int):
    def fn(batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


def parse(argv: Sequence[str] | None = None) -> tuple[ScriptArguments, MedCareConfig, TrainingArguments]:
    parser = HfArgumentParser((ScriptArguments, _config_flags(), TrainingArguments))
    script, flags, args = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return script, MedCareConfig(**dataclasses.asdict(flags)), args


def build_model(script: ScriptArguments, cfg: MedCareConfig, args: TrainingArguments) -> torch.nn.Module:
    # The adapters are initialised from the seed, so every process starts from the same model.
    transformers.set_seed(args.seed)
    _ = args.device  # sets up the process group first: under ZeRO-3 from_pretrained partitions while loading
    model = transformers.AutoModelForCausalLM.from_pretrained(script.model, dtype=getattr(torch, script.dtype))
    if script.stage == 1:
        return apply_stage1(model, cfg)
    to_stage2(model, cfg)
    if script.from_stage1 is None:
        raise SystemExit("--stage 2 needs --from_stage1 DIR (the stage-1 adapter)")
    load_adapter(model, script.from_stage1)
    return model


def build_trainer(argv: Sequence[str] | None = None, model_hook=None,
                  **trainer_kwargs) -> tuple[MedCareTrainer, TrainingArguments]:
    """The trainer for ``argv``; ``model_hook(model)`` (tests, experiments) edits the prepared model."""
    script, cfg, args = parse(argv)
    tokenizer = None
    if not os.path.isdir(script.model) or any(os.path.exists(os.path.join(script.model, f)) for f in _TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(script.model)
    model = build_model(script, cfg, args)
    if model_hook is not None:
        model_hook(model)
    pad = getattr(model.config, "pad_token_id", None)
    pad = pad if pad is not None else (tokenizer.pad_token_id if tokenizer is not None else 0) or 0
    trainer = MedCareTrainer(model=model, args=args, train_dataset=JsonlDataset(script.data, tokenizer, script.max_length),
                             data_collator=collate(pad), processing_class=tokenizer, medcare_config=cfg,
                             **trainer_kwargs)
    return trainer, args


def main(argv: Sequence[str] | None = None, model_hook=None, **trainer_kwargs) -> MedCareTrainer:
    trainer, args = build_trainer(argv, model_hook, **trainer_kwargs)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # the adapter (adapter.safetensors + medcare_config.json), rank 0 writes
    return trainer


if __name__ == "__main__":
    main(sys.argv[1:])
