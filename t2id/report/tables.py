"""The report's tables from grid/trials.parquet (pure pandas/numpy; no I/O).

A trial is (fold, strategy, seed); trials.parquet has one row per trial and class ("all classes"
first). Table II layout (paper, Table II): one column per strategy, one row per class with "all
classes" first, each cell the metric in percent as mean ± std over folds AND seeds (sample std,
ddof=1, everywhere in the report; a single trial shows the mean only), n = folds x seeds trials.

Beside it, for each strategy and class, the paired comparison with the baseline (t2id.significance):
  - an exact sign-flip test over the (fold, seed) differences, seeds of a fold flipping together
    (clusters = folds), its p-value in every cell and a mark only where p <= report.alpha;
  - where per-image predictions exist, an image-level paired bootstrap interval of the difference
    (t2id.report.image_bootstrap): evaluation noise only.
Older trials tables without the seed column count as one seed per fold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from t2id.significance import min_attainable_p, sign_flip_pvalue

ALL = "all classes"
NO_SEED = -1  # trials tables written before seeds were a grid axis: one unnamed seed per fold
# Column headers of the paper's Table II for the preset strategies (CSV files keep the ids).
PAPER_LABELS = {"baseline": "Baseline", "mosaic_mixup": "Mosaic+Mixup", "rfs": "RFS", "cas": "CAS",
                "baseline_sdxl": "Baseline+SDXL", "rfs_sdxl": "RFS+SDXL", "t2id_cas": "T2ID-CAS",
                "class_weights": "Class weights"}
BUDGET_COLUMNS = ("budget_unit", "budget", "optimizer_steps", "images_seen", "n_synthetic", "selection")


def paper_headers(table: pd.DataFrame) -> pd.DataFrame:
    """The same table with preset strategy ids shown as the paper's column names."""
    return table.rename(columns=lambda c: PAPER_LABELS.get(c, c))


def with_seeds(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials with a seed column (NO_SEED where the grid did not record one)."""
    if "seed" in trials:
        return trials.assign(seed=trials["seed"].fillna(NO_SEED).astype(np.int64))
    return trials.assign(seed=np.int64(NO_SEED))


def ok_rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trained (not skipped) rows with a value of `metric`."""
    rows = trials[trials["status"].fillna("ok") == "ok"] if "status" in trials else trials
    return rows[rows[metric].notna()]


def row_order(trials: pd.DataFrame, classes: list[str] | None = None) -> list[str]:
    names = list(classes) if classes is not None else [c for c in dict.fromkeys(trials["class"]) if c != ALL]
    return [ALL, *[c for c in names if c != ALL]]


def column_order(trials: pd.DataFrame, strategies: list[str] | None = None) -> list[str]:
    return list(strategies) if strategies is not None else list(dict.fromkeys(trials["strategy"]))


def design(trials: pd.DataFrame) -> tuple[list[int], list[int]]:
    """(folds, seeds) of the grid, from every trial (skipped ones included)."""
    trials = with_seeds(trials)
    return (sorted(int(f) for f in trials["fold"].unique()), sorted(int(s) for s in trials["seed"].unique()))


def summary_stats(trials: pd.DataFrame, metric: str = "map50_95", strategies: list[str] | None = None,
                  classes: list[str] | None = None) -> pd.DataFrame:
    """Long table: strategy, class, mean, std (ddof=1), n (trials = folds x seeds), n_folds, n_seeds."""
    rows = with_seeds(ok_rows(trials, metric))
    grouped = rows.groupby(["strategy", "class"])
    stats = pd.DataFrame({"mean": grouped[metric].mean(), "std": grouped[metric].std(ddof=1),
                          "n": grouped[metric].count(), "n_folds": grouped["fold"].nunique(),
                          "n_seeds": grouped["seed"].nunique()}).reset_index()
    full = pd.MultiIndex.from_product([column_order(trials, strategies), row_order(trials, classes)],
                                      names=["strategy", "class"]).to_frame(index=False)
    out = full.merge(stats, on=["strategy", "class"], how="left").fillna({"n": 0, "n_folds": 0, "n_seeds": 0})
    return out.astype({"n": int, "n_folds": int, "n_seeds": int})


def format_cell(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    if n == 0 or pd.isna(mean):
        return "—"
    if n < 2 or pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def table_ii(trials: pd.DataFrame, metric: str = "map50_95", strategies: list[str] | None = None,
             classes: list[str] | None = None) -> pd.DataFrame:
    """Paper Table II layout: index = classes ("all classes" first), columns = strategies, 'mean ± std' in %."""
    stats = summary_stats(trials, metric, strategies, classes)
    stats["cell"] = [format_cell(m, s, n) for m, s, n in zip(stats["mean"], stats["std"], stats["n"])]
    table = stats.pivot(index="class", columns="strategy", values="cell")
    table = table.loc[row_order(trials, classes), column_order(trials, strategies)]
    table.index.name = "class"
    table.columns.name = None
    return table


def n_statement(stats: pd.DataFrame) -> str:
    """'n = 2 folds x 2 seeds = 4 trials per cell' (or the range when skipped trials thin some cells)."""
    trained = stats[stats["n"] > 0]
    if trained.empty:
        return "n = 0 trials (nothing trained)"
    folds, seeds, n = (sorted(set(trained[c])) for c in ("n_folds", "n_seeds", "n"))
    if len(n) == 1 and len(folds) == 1 and len(seeds) == 1:
        plural = {1: ""}
        return (f"n = {folds[0]} fold{plural.get(folds[0], 's')} × {seeds[0]} seed{plural.get(seeds[0], 's')} "
                f"= {n[0]} trial{plural.get(n[0], 's')} per cell")
    return f"n = {min(n)} to {max(n)} trials per cell (folds × seeds; see table_ii_stats.csv)"


def paired_differences(trials: pd.DataFrame, baseline: str, strategy: str, name: str,
                       metric: str) -> pd.DataFrame:
    """fold, seed, diff (strategy - baseline) of class `name` over the (fold, seed) where both trained."""
    rows = with_seeds(ok_rows(trials, metric))
    rows = rows[(rows["class"] == name) & rows["strategy"].isin([strategy, baseline])]
    wide = rows.pivot_table(index=["fold", "seed"], columns="strategy", values=metric, aggfunc="first")
    if not {strategy, baseline} <= set(wide.columns):
        return pd.DataFrame(columns=["fold", "seed", "diff"])
    pair = wide[[strategy, baseline]].dropna()
    return pd.DataFrame({"diff": (pair[strategy] - pair[baseline]).to_numpy(dtype=float)},
                        index=pair.index).reset_index()


def sign_flip(trials: pd.DataFrame, baseline: str = "baseline", metric: str = "map50_95", alpha: float = 0.05,
              strategies: list[str] | None = None, classes: list[str] | None = None,
              seed: int = 0) -> pd.DataFrame:
    """Per (strategy, class): mean paired difference to `baseline` and its exact sign-flip p-value.

    Units are the (fold, seed) pairs where both strategies trained; seeds of one fold flip together
    (clusters = folds), so the test's n is the number of folds and its smallest attainable p is
    2 / 2^folds. `significant` is p <= alpha. Differences are in the metric's units (fractions).
    """
    out = []
    for strategy in column_order(trials, strategies):
        if strategy == baseline:
            continue
        for name in row_order(trials, classes):
            d = paired_differences(trials, baseline, strategy, name, metric)
            n_folds = int(d["fold"].nunique())
            p = sign_flip_pvalue(d["diff"], clusters=d["fold"].tolist(), seed=seed) if len(d) else np.nan
            out.append({"strategy": strategy, "class": name, "n_pairs": len(d), "n_folds": n_folds,
                        "n_seeds": int(d["seed"].nunique()),
                        "mean_diff": float(d["diff"].mean()) if len(d) else np.nan,
                        "p_value": float(p), "min_p": min_attainable_p(n_folds) if n_folds else np.nan,
                        "significant": bool(len(d) and p <= alpha)})
    return pd.DataFrame(out, columns=["strategy", "class", "n_pairs", "n_folds", "n_seeds", "mean_diff", "p_value",
                                      "min_p", "significant"])


def comparison_table(tests: pd.DataFrame, strategies: list[str], classes: list[str],
                     scale: float = 100.0) -> pd.DataFrame:
    """Long comparison table as Table II layout: 'Δ [low, high] p=0.50' in percentage points, '*' if significant.

    [low, high] is the image-level bootstrap interval where `tests` has boot_low/boot_high values.
    """
    def cell(r) -> str:
        if r.n_pairs == 0 or pd.isna(r.mean_diff):
            return "—"
        text = f"{r.mean_diff * scale:+.1f}"
        low, high = getattr(r, "boot_low", np.nan), getattr(r, "boot_high", np.nan)
        if pd.notna(low) and pd.notna(high):
            text += f" [{low * scale:+.1f}, {high * scale:+.1f}]"
        return text + f" p={r.p_value:.3g}" + (" *" if r.significant else "")

    rows = [ALL, *[c for c in classes if c != ALL]]
    if tests.empty:
        return pd.DataFrame(index=pd.Index(rows, name="class"))
    cols = [s for s in strategies if s in set(tests["strategy"])]
    table = pd.DataFrame({"strategy": tests["strategy"], "class": tests["class"],
                          "cell": [cell(r) for r in tests.itertuples()]})
    table = table.pivot(index="class", columns="strategy", values="cell").loc[rows, cols]
    table.columns.name = None
    return table


def min_p_statement(n_folds: int, alpha: float) -> str:
    """What the design can show: the smallest p the sign-flip test can return with `n_folds` folds."""
    floor = min_attainable_p(n_folds)
    text = f"With {n_folds} fold{'s' if n_folds != 1 else ''} the smallest possible p is {floor:.3g}"
    if floor > alpha:
        return text + f"; no difference can be significant at alpha = {alpha:g}, however large."
    return text + f" (alpha = {alpha:g})."


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def budgets(trials: pd.DataFrame, strategies: list[str] | None = None) -> pd.DataFrame:
    """Per strategy: the compute budget and what each trial used (from the 'all classes' rows)."""
    rows = with_seeds(trials[trials["class"] == ALL])
    if "status" in rows:
        rows = rows[rows["status"].fillna("ok") == "ok"]
    out = []
    for strategy in column_order(trials, strategies):
        sel = rows[rows["strategy"] == strategy]
        if sel.empty:
            continue
        entry: dict = {"strategy": strategy, "trials": len(sel)}
        for col in BUDGET_COLUMNS:
            if col not in sel:
                entry[col] = "not recorded"
                continue
            values = sel[col].dropna()
            if values.empty:
                entry[col] = "not recorded"
            elif pd.api.types.is_numeric_dtype(values):
                low, high = _number(values.min()), _number(values.max())
                entry[col] = low if low == high else f"{low}–{high}"
            else:
                entry[col] = ", ".join(str(v) for v in dict.fromkeys(values))
        out.append(entry)
    return pd.DataFrame(out, columns=["strategy", "trials", *BUDGET_COLUMNS])


def synthetic_per_trial(trials: pd.DataFrame, strategies: list[str] | None = None) -> pd.DataFrame:
    """Synthetic images each trial trained on (n_synthetic of its 'all classes' row), fold x strategy."""
    if "n_synthetic" not in trials:
        return pd.DataFrame()
    rows = with_seeds(trials[trials["class"] == ALL])
    if "status" in rows:
        rows = rows[rows["status"].fillna("ok") == "ok"]
    rows = rows[rows["n_synthetic"].fillna(0) > 0]
    if rows.empty:
        return pd.DataFrame()
    table = rows.pivot_table(index="fold", columns="strategy", values="n_synthetic", aggfunc="max")
    table = table[[s for s in column_order(trials, strategies) if s in table.columns]].astype(int)
    table.columns.name = None
    return table


def training_time(trials: pd.DataFrame, strategies: list[str] | None = None) -> pd.DataFrame:
    """Mean training seconds per strategy (one value per trial, read from its 'all classes' row)."""
    rows = trials[(trials["class"] == ALL) & trials["train_seconds"].notna()]
    out = rows.groupby("strategy")["train_seconds"].agg(["mean", "sum", "count"]).reset_index()
    order = {s: i for i, s in enumerate(column_order(trials, strategies))}
    return out.sort_values("strategy", key=lambda s: s.map(order)).reset_index(drop=True)


def skipped_trials(trials: pd.DataFrame) -> pd.DataFrame:
    if "status" not in trials:
        return pd.DataFrame(columns=["fold", "strategy", "seed", "reason"])
    rows = with_seeds(trials[(trials["status"] == "skipped") & (trials["class"] == ALL)])
    return rows[["fold", "strategy", "seed", "reason"]].reset_index(drop=True)
