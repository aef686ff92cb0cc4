"""Pictures of stage 2's Optuna study for the parent run: optimisation history and parallel
coordinates, as PNG (Optuna's matplotlib backend), and the same plus parameter importances as
HTML (Optuna's default backend, plotly: a dependency; in an environment without it no HTML is
written, and nothing fails). The importances' numbers are
`param_importances.csv` (search.param_importances)."""
from __future__ import annotations

import importlib.util
import os
import warnings


def study_pngs(storage_url: str | None, study_name: str, folder: str) -> list[str]:
    """Paths of the PNGs written into `folder`; none without a stored study or finished trials."""
    if storage_url is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        return []
    finite = [t for t in study.trials if t.value is not None and t.value != float("inf")]
    if not finite:
        return []
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "experimental" warnings of Optuna's matplotlib backend
        for name, draw in (("optuna_history.png", ovm.plot_optimization_history),
                           ("optuna_parallel_coordinates.png", ovm.plot_parallel_coordinate)):
            try:
                ax = draw(study)
            except (ValueError, RuntimeError):   # e.g. too few finished trials for the plot
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = os.path.join(folder, name)
            fig.savefig(path, dpi=90, bbox_inches="tight")
            plt.close(fig)
            out.append(path)
    return out


HTML_PLOTS = ("optuna_history.html", "optuna_parallel_coordinates.html", "optuna_param_importances.html")


def study_htmls(storage_url: str | None, study_name: str, folder: str) -> list[str]:
    """Paths of the interactive HTML plots written into `folder`; none without plotly, without a
    stored study or without finished trials."""
    if storage_url is None or importlib.util.find_spec("plotly") is None:
        return []
    import optuna
    from optuna import visualization as ov

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        return []
    if not any(t.value is not None and t.value != float("inf") for t in study.trials):
        return []
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, draw in zip(HTML_PLOTS, (ov.plot_optimization_history, ov.plot_parallel_coordinate,
                                           ov.plot_param_importances)):
            try:
                fig = draw(study)
            except Exception:   # too few finished trials, +inf values: a plot never fails the search
                continue
            path = os.path.join(folder, name)
            fig.write_html(path, include_plotlyjs=True)   # self-contained: opens without a network
            out.append(path)
    return out
