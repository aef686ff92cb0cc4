"""Pictures of stage 2's Optuna study for the parent run: optimisation history and parallel
coordinates, as PNG (Optuna's matplotlib backend; its HTML backend needs plotly, which orbitgen
does not install). Parameter importances are not drawn: the study has one parameter (the subset)."""
from __future__ import annotations

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
