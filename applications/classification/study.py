"""CGE vs RGE vs FO across CNN depths (DeepZero, Chen et al. 2024, Fig. 2), on real data.

Every cell (depth, method, seed) trains the dense depth-d CNN with the same epochs, batches and
seed; RGE uses q = d directions so that its query budget per step equals CGE's ((d + 1)·B).
One MLflow parent run holds the table and plots; each cell is a child run.
"""
from __future__ import annotations

import copy
import statistics
from collections import defaultdict

from applications.classification.config import ClassifyConfig
from core.runtime.errors import UserError

METHOD_KEYS = {"fo": "fo", "cge": "zo-cge", "rge": "zo-rge"}


def _ints(text: str | None, default: list[int], what: str) -> list[int]:
    if text is None:
        return default
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, e.g. 1,2,3; got '{text}'")
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{what} must be positive integers; got '{text}'")
    return vals


def summarize(results: list[dict]) -> list[dict]:
    """Mean ± std of the final metrics per (depth, method)."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["depth"], r["method"])].append(r)
    rows = []
    for (depth, method), rs in sorted(groups.items()):
        accs = [r["test_accuracy"] for r in rs]
        rows.append({"depth": depth, "method": method, "params": rs[0]["params"], "seeds": len(rs),
                     "acc_mean": statistics.fmean(accs), "acc_std": statistics.pstdev(accs),
                     "queries": statistics.fmean(r["queries"] for r in rs),
                     "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs)})
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'depth':>5} {'method':>6} {'params':>7} {'seeds':>5} {'test acc (%)':>16} {'queries':>10} {'wall (s)':>9}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['depth']:>5} {r['method']:>6} {r['params']:>7} {r['seeds']:>5} "
                     f"{100 * r['acc_mean']:>9.2f} ± {100 * r['acc_std']:<5.2f} {r['queries']:>10.3g} "
                     f"{r['wall_time_s']:>9.1f}")
    return "\n".join(lines) + "\n"


def study_cells(cfg: ClassifyConfig, depth_list: list[int], method_list: list[str], n_seeds: int,
                rge_lr_scale: float) -> list[tuple[str, ClassifyConfig]]:
    """Every (depth, method, seed) cell as (name, config): dense; RGE with q = d and a 10× smaller lr."""
    cells = []
    for depth in depth_list:
        for method in method_list:
            for s in range(n_seeds):
                cell = copy.deepcopy(cfg)
                cell.model.depth, cell.optim.method = depth, METHOD_KEYS[method]
                cell.run.seed, cell.zo.sparsity, cell.zo.q = cfg.run.seed + s, 0.0, 0
                if method == "rge":
                    cell.optim.lr = cfg.optim.lr * rge_lr_scale
                cell.validate()
                cells.append((f"d{depth}-{method}-s{cell.run.seed}", cell))
    return cells


def run_study(cfg: ClassifyConfig, *, depths: str | None, methods: str | None, seeds: int | None, quick: bool,
              progress: bool, rge_lr_scale: float = 0.1) -> int:
    from applications.classification.train import ClassifyExperiment, count_params
    from core.runtime.config import flatten
    from core.runtime.data import load_dataset
    from core.runtime.errors import user_errors
    from core.runtime.loop import run_experiment, run_sweep
    from core.runtime.plotting import line_plot, tsv

    depth_list = _ints(depths, [1, 2] if quick else [1, 2, 3, 4, 5], "--depths")
    method_list = [m.strip() for m in (methods or "fo,cge,rge").split(",") if m.strip()]
    bad = [m for m in method_list if m not in METHOD_KEYS]
    if bad or not method_list:
        raise UserError(f"--methods must be a subset of fo,cge,rge; got '{methods}'")
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise UserError(f"--seeds must be >= 1; got {n_seeds}")
    with user_errors():
        data = load_dataset(cfg.data.name, cfg.data.data_root, image_size=cfg.data.image_size)
    cells = study_cells(cfg, depth_list, method_list, n_seeds, rge_lr_scale)
    with user_errors():                      # every depth's model fits the data before any run is opened
        for depth in depth_list:
            ClassifyExperiment(next(c for _, c in cells if c.model.depth == depth), data=copy.deepcopy(data))

    def run_cell(name: str, cell: ClassifyConfig, tracker) -> dict:
        exp = ClassifyExperiment(cell, data=copy.deepcopy(data))
        out = run_experiment(exp, tracker, progress=progress, save_checkpoints=False)
        if out.stopped is not None:
            raise UserError(f"study cell {name} stopped: {out.stopped}")
        last = out.history[-1]
        row = {"depth": cell.model.depth, "method": next(k for k, v in METHOD_KEYS.items() if v == cell.optim.method),
               "seed": cell.run.seed, "params": count_params(exp.model), "test_accuracy": last["test_accuracy"],
               "queries": last["queries"], "wall_time_s": last["wall_time_s"]}
        print(f"{name:>14}: params {row['params']:>6}  test_accuracy {row['test_accuracy']:.4f}  "
              f"queries {row['queries']:.3g}  wall {row['wall_time_s']:.1f}s", flush=True)
        return row

    def summarize_study(parent, results: list[dict]) -> None:
        rows = summarize(results)
        parent.log_text(format_table(rows), "study/table.txt")
        parent.log_text(tsv(rows), "study/table.tsv")
        parent.log_text(tsv(results), "study/cells.tsv")
        by_method = defaultdict(list)
        for r in rows:
            by_method[r["method"]].append(r)
        for key, label, fname, logx in (("params", "parameters", "accuracy_vs_params.png", False),
                                        ("queries", "queries per run", "accuracy_vs_queries.png", True),
                                        ("wall_time_s", "wall time (s)", "accuracy_vs_wall_time.png", True)):
            series = {m: ([r[key] for r in rs], [r["acc_mean"] for r in rs]) for m, rs in by_method.items()}
            errs = {m: [r["acc_std"] for r in rs] for m, rs in by_method.items()}
            fig = line_plot(series, xlabel=label, ylabel="test accuracy", logx=logx, errors=errs,
                            title=f"CGE vs RGE vs FO on {cfg.data.name}")
            parent.log_figure(fig, f"study/{fname}")
        parent.log_metrics({f"acc_{r['method']}_d{r['depth']}": r["acc_mean"] for r in rows})
        summarize_study.table = format_table(rows)

    params = {**flatten(cfg), "study.depths": depth_list, "study.methods": method_list, "study.seeds": n_seeds,
              "study.rge_lr_scale": rge_lr_scale}
    parent_id, results = run_sweep("classify", cells, run_cell, name="study", params=params,
                                   experiment=cfg.run.experiment, summarize=summarize_study)
    print(summarize_study.table, end="")
    print(f"study run {parent_id} (children: {len(results)})")
    return 0
