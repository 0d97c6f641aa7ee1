"""PNG pictures of a run's statistics, readable at a glance (titles, labelled axes, log scales where
the data spans decades)."""

from __future__ import annotations

from pathlib import Path

from deepseek_ptq.observe.stats import RunStats, amax_by_layer


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters; never pick an interactive backend
    import matplotlib.pyplot as plt

    return plt


def write_plots(stats: RunStats, plots_dir: Path, title: str) -> list[Path]:
    """Every plot the statistics allow; returns the files written."""
    plots_dir.mkdir(exist_ok=True)
    written = []
    if stats.tokens:
        written.append(expert_token_heatmap(stats, plots_dir / "expert_tokens.png", title))
    ratios = [r.after / r.before for r in stats.expert_rows("w2") if r.before and r.after is not None]
    if ratios:
        written.append(sync_ratio_histogram(ratios, plots_dir / "w2_input_sync_ratio.png", title))
    for role in ("input", "weight"):
        if amax_by_layer(stats, role):
            written.append(amax_by_layer_plot(stats, role, plots_dir / f"{role}_amax_by_layer.png", title))
    return written


def expert_token_heatmap(stats: RunStats, path: Path, title: str) -> Path:
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    layers = sorted(stats.tokens)
    counts = np.array([stats.tokens[layer] for layer in layers], dtype=float)
    n_experts = counts.shape[1]
    fig, ax = plt.subplots(figsize=(min(4 + n_experts / 12, 24), 1.5 + 0.35 * len(layers)))
    # Experts without tokens are drawn in the "under" colour: a log scale cannot show zero.
    cmap = plt.get_cmap("viridis").with_extremes(under="black")
    image = ax.imshow(np.where(counts > 0, counts, 0.5), aspect="auto", interpolation="nearest", cmap=cmap,
                      norm=LogNorm(vmin=1, vmax=max(counts.max(), 2)))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    zero = int((counts == 0).sum())
    ax.set_title(f"Routed tokens per expert (log scale; black: no tokens, {zero} experts)\n{title}", fontsize=9)
    fig.colorbar(image, ax=ax, label="tokens")
    return _save(fig, path)


def sync_ratio_histogram(ratios: list[float], path: Path, title: str) -> Path:
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    values = np.array(ratios)
    log_x = values.max() / max(values.min(), 1e-12) > 20
    bins = np.geomspace(max(values.min(), 1e-6), values.max() * 1.0001, 40) if log_x else 40
    ax.hist(values, bins=bins, color="tab:blue")
    if log_x:
        ax.set_xscale("log")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("expert w2 input amax: synced / own (1 = unchanged)")
    ax.set_ylabel("experts")
    ax.set_title(f"Peer-max sync of w2 input amax: median x{np.median(values):.2f}, "
                 f"{(values > 1).mean():.0%} raised\n{title}", fontsize=9)
    return _save(fig, path)


def amax_by_layer_plot(stats: RunStats, role: str, path: Path, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    after, before = amax_by_layer(stats, role, "after"), amax_by_layer(stats, role, "before")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    values = [v for layers in (*after.values(), *before.values()) for vs in layers.values() for v in vs if v > 0]
    for kind in sorted(after):
        layers = sorted(after[kind])
        line = ax.plot(layers, [max(after[kind][layer]) for layer in layers], marker="o", label=kind)[0]
        own = before.get(kind, {})
        if any(len(own.get(layer, [])) > 1 for layer in layers):  # experts: the spread of their own amax
            spread = [layer for layer in layers if own.get(layer)]
            ax.fill_between(spread, [min(own[layer]) for layer in spread], [max(own[layer]) for layer in spread],
                            color=line.get_color(), alpha=0.15)
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{role} amax after the fixup (band: experts' own, min-max)")
    ax.set_title(f"{role.capitalize()} amax by layer and linear kind\n{title}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
