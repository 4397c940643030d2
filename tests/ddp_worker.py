"""Started by tests/test_distributed.py under torchrun: trains `tiny_cpu` with the given overrides,
then writes this rank's parameters to <out_dir>/rank<r>.safetensors."""
import sys

from safetensors.torch import save_file

from unigendet import load_config
from unigendet.train import Trainer

if __name__ == "__main__":
    cfg = load_config("tiny_cpu", sys.argv[1:])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    params = {n: p.detach().contiguous() for n, p in trainer.model.named_parameters()}
    save_file(params, f"{cfg.train.out_dir}/rank{trainer.dist.rank}.safetensors")
