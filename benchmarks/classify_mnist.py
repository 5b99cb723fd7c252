"""FO vs ZO-CGE vs ZO-RGE on real MNIST with the depth-d CNN: same epochs, batches and seeds.

RGE uses q = d directions per step, so its query budget equals CGE's ((d + 1)·B per step) — the
paper's Figure 2 comparison — and a 10× smaller learning rate (the paper used 1e-3 / 1e-4).
Each cell is a real ``deepzero classify`` training run (logged to MLflow). Prints a table of final
test accuracy (mean ± std over seeds), queries and wall time; writes JSON.

    python -m benchmarks.classify_mnist --depth 3 --epochs 3 --seeds 2 --train-subset 1024
"""
from __future__ import annotations

import argparse
import copy

from benchmarks.common import setup, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--train-subset", type=int, default=1024, help="training images (0 = all 4,000)")
    p.add_argument("--methods", default="fo,cge,rge")
    p.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()
    setup()
    from applications.classification.config import ClassifyConfig
    from applications.classification.study import format_table, summarize
    from applications.classification.train import ClassifyExperiment, count_params
    from core.runtime.loop import run_experiment
    from core.runtime.data import load_dataset
    from core.runtime.tracking import Tracker

    keys = {"fo": "fo", "cge": "zo-cge", "rge": "zo-rge"}
    data = load_dataset("mnist")
    results = []
    for method in args.methods.split(","):
        for seed in range(args.seeds):
            cfg = ClassifyConfig()
            cfg.model.depth, cfg.optim.method, cfg.run.seed = args.depth, keys[method], seed
            cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.optim.weight_decay = args.epochs, 0, 0.0
            cfg.optim.lr = args.lr * (0.1 if method == "rge" else 1.0)
            cfg.data.train_subset, cfg.zo.sparsity = args.train_subset, 0.0
            cfg.validate()
            with Tracker("classify", run_name=f"bench-d{args.depth}-{method}-s{seed}") as tr:
                exp = ClassifyExperiment(cfg, data=copy.deepcopy(data))
                out = run_experiment(exp, tr, progress=False, save_checkpoints=False)
            last = out.history[-1]
            results.append({"depth": args.depth, "method": method, "seed": seed, "params": count_params(exp.model),
                            "test_accuracy": last["test_accuracy"], "queries": last["queries"],
                            "wall_time_s": last["wall_time_s"]})
            print(f"{method:>4} seed {seed}: test_accuracy {last['test_accuracy']:.4f}  queries "
                  f"{last['queries']:.3g}  wall {last['wall_time_s']:.1f}s", flush=True)
    rows = summarize(results)
    print(format_table(rows), end="")
    print(f"wrote {write_json(f'classify_mnist_d{args.depth}', {'args': vars(args), 'cells': results, 'rows': rows})}")


if __name__ == "__main__":
    main()
