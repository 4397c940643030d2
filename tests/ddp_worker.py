"""Started by tests/test_distributed.py under torchrun: writes its pid to <out_dir>.pids/rank<r>.pid
(beside the run folder: train refuses a non-empty folder that is not a run),
trains `tiny_cpu` with the given overrides (`--resume` continues the run in train.out_dir), then,
for data parallel, writes this rank's parameters to <out_dir>/rank<r>.safetensors; FSDP ranks hold
shards (the checkpoint has the weights) and write what they hold to <out_dir>/rank<r>.json:
elements of parameters, AdamW moments and EMA."""
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from unigendet import load_config
from unigendet.train import Trainer

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--resume"]
    cfg = load_config("tiny_cpu", args)
    pids = Path(cfg.train.out_dir + ".pids")
    pids.mkdir(parents=True, exist_ok=True)
    (pids / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    trainer = Trainer(cfg, resume="--resume" in sys.argv, log=lambda *_: None)
    trainer.train()
    if cfg.train.fsdp:
        from unigendet.train.fsdp import local

        moments = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k != "step"]
        held = {"params": sum(local(p).numel() for p in trainer.model.parameters()),
                "params_full": sum(p.numel() for p in trainer.model.parameters()),
                "moments": sum(local(t).numel() for t in moments),
                "ema": sum(local(p).numel() for p in trainer.ema.model.parameters())}
        with open(f"{cfg.train.out_dir}/rank{trainer.dist.rank}.json", "w") as f:
            json.dump(held, f)
    else:
        params = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}
        save_file(params, f"{cfg.train.out_dir}/rank{trainer.dist.rank}.safetensors")
