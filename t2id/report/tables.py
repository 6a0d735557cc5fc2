"""The report's tables from grid/trials.parquet (pure pandas/numpy; no I/O).

Table II layout (paper, Table II): one column per strategy, one row per class with "all classes"
first, each cell the metric in percent as mean ± std over folds (sample std, ddof=1; a single fold
shows the mean only). Beside it, for each strategy and class, the paired bootstrap of the difference
to the baseline: the folds are the paired units (each fold's validation images are the same for
every strategy), resampled with replacement; the interval is the percentile interval of the mean
paired difference.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ALL = "all classes"
# Column headers of the paper's Table II for the preset strategies (CSV files keep the ids).
PAPER_LABELS = {"baseline": "Baseline", "mosaic_mixup": "Mosaic+Mixup", "rfs": "RFS", "cas": "CAS",
                "baseline_sdxl": "Baseline+SDXL", "rfs_sdxl": "RFS+SDXL", "t2id_cas": "T2ID-CAS",
                "class_weights": "Class weights"}


def paper_headers(table: pd.DataFrame) -> pd.DataFrame:
    """The same table with preset strategy ids shown as the paper's column names."""
    return table.rename(columns=lambda c: PAPER_LABELS.get(c, c))


def ok_rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trained (not skipped) rows with a value of `metric`."""
    rows = trials[trials["status"].fillna("ok") == "ok"] if "status" in trials else trials
    return rows[rows[metric].notna()]


def row_order(trials: pd.DataFrame, classes: list[str] | None = None) -> list[str]:
    names = list(classes) if classes is not None else [c for c in dict.fromkeys(trials["class"]) if c != ALL]
    return [ALL, *[c for c in names if c != ALL]]


def column_order(trials: pd.DataFrame, strategies: list[str] | None = None) -> list[str]:
    return list(strategies) if strategies is not None else list(dict.fromkeys(trials["strategy"]))


def summary_stats(trials: pd.DataFrame, metric: str = "map50_95", strategies: list[str] | None = None,
                  classes: list[str] | None = None) -> pd.DataFrame:
    """Long table: strategy, class, mean, std (ddof=1), n_folds of `metric` over folds (fractions)."""
    rows = ok_rows(trials, metric)
    grouped = rows.groupby(["strategy", "class"])[metric]
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n_folds": grouped.count()})
    stats = stats.reset_index()
    full = pd.MultiIndex.from_product([column_order(trials, strategies), row_order(trials, classes)],
                                      names=["strategy", "class"]).to_frame(index=False)
    return full.merge(stats, on=["strategy", "class"], how="left").fillna({"n_folds": 0}).astype({"n_folds": int})


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
    stats["cell"] = [format_cell(m, s, n) for m, s, n in zip(stats["mean"], stats["std"], stats["n_folds"])]
    table = stats.pivot(index="class", columns="strategy", values="cell")
    table = table.loc[row_order(trials, classes), column_order(trials, strategies)]
    table.index.name = "class"
    table.columns.name = None
    return table


def paired_bootstrap(trials: pd.DataFrame, baseline: str = "baseline", metric: str = "map50_95",
                     n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                     strategies: list[str] | None = None, classes: list[str] | None = None) -> pd.DataFrame:
    """Per (strategy, class): mean paired difference to `baseline` over folds and its bootstrap CI.

    Differences are in the metric's units (fractions). Only folds where both strategies trained are
    paired. With fewer than 2 paired folds the interval is not defined (NaN).
    """
    rows = ok_rows(trials, metric)
    wide = rows.pivot_table(index=["class", "fold"], columns="strategy", values=metric, aggfunc="first")
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    out = []
    for strategy in column_order(trials, strategies):
        if strategy == baseline:
            continue
        for name in row_order(trials, classes):
            diffs = np.array([], dtype=float)
            if name in wide.index.get_level_values("class") and {strategy, baseline} <= set(wide.columns):
                pair = wide.loc[name, [strategy, baseline]].dropna()
                diffs = (pair[strategy] - pair[baseline]).to_numpy(dtype=float)
            low = high = np.nan
            if diffs.size >= 2:
                # Resample folds with replacement, keeping each fold's pair together.
                idx = rng.integers(0, diffs.size, size=(n_boot, diffs.size))
                means = diffs[idx].mean(axis=1)
                low, high = np.quantile(means, [alpha, 1.0 - alpha])
            out.append({"strategy": strategy, "class": name, "n_folds": int(diffs.size),
                        "mean_diff": float(diffs.mean()) if diffs.size else np.nan,
                        "ci_low": float(low), "ci_high": float(high),
                        "excludes_zero": bool(diffs.size >= 2 and (low > 0 or high < 0))})
    return pd.DataFrame(out, columns=["strategy", "class", "n_folds", "mean_diff", "ci_low", "ci_high",
                                      "excludes_zero"])


def bootstrap_table(ci: pd.DataFrame, strategies: list[str], classes: list[str], scale: float = 100.0) -> pd.DataFrame:
    """CI long table as Table II layout: cells 'Δ [low, high]' in percentage points."""
    def cell(r) -> str:
        if r.n_folds == 0 or pd.isna(r.mean_diff):
            return "—"
        if pd.isna(r.ci_low):
            return f"{r.mean_diff * scale:+.1f}"
        mark = " *" if r.excludes_zero else ""
        return f"{r.mean_diff * scale:+.1f} [{r.ci_low * scale:+.1f}, {r.ci_high * scale:+.1f}]{mark}"

    cols = [s for s in strategies if s in set(ci["strategy"])]
    if ci.empty:
        return pd.DataFrame(index=pd.Index([ALL, *classes], name="class"))
    table = pd.DataFrame({"strategy": ci["strategy"], "class": ci["class"],
                          "cell": [cell(r) for r in ci.itertuples()]})
    rows = [ALL, *[c for c in classes if c != ALL]]
    table = table.pivot(index="class", columns="strategy", values="cell").loc[rows, cols]
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
        return pd.DataFrame(columns=["fold", "strategy", "reason"])
    rows = trials[(trials["status"] == "skipped") & (trials["class"] == ALL)]
    return rows[["fold", "strategy", "reason"]].reset_index(drop=True)
