"""The eval harness's summaries, markdown tables and plots (weightgen.harness runs the protocol)."""
from __future__ import annotations

import json
from pathlib import Path

THRESHOLDS = (0.95, 0.975)
UNSEEN = ("shifted", "elastic", "mnist8")
UNSEEN_TITLES = {"shifted": "rolled 1 px", "elastic": "elastic", "mnist8": "MNIST 8x8 (unseen source)"}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def steps_to(curve: dict, threshold: float):
    """First grid step whose accuracy reaches ``threshold`` (None: not within the grid)."""
    return next((s for s in sorted(curve) if curve[s] >= threshold), None)


def _select(rows: list[dict], variant: str, split: str) -> list[dict]:
    return [r for r in rows if r["variant"] == variant and split in (r["kind"], "all")]


def summarize(res: dict, ft_steps) -> list[dict]:
    """Means over tasks per (variant, method, split); split "all" pools both kinds. Support-sweep rows
    carry ``per_class``, class-count rows ``num_classes``."""
    out = []
    variants = dict.fromkeys(r["variant"] for r in res["per_task"])
    for variant in variants:
        for split in [*res["tasks"], "all"]:
            for m in res["methods"]:
                rows = [r for r in _select(res["per_task"], variant, split) if r["method"] == m]
                if not rows:
                    continue
                s = {"variant": variant, "method": m, "split": split, "tasks": len(rows),
                     **{f: _mean(r.get(f) for r in rows) for f in ("mean", "best", "oracle", "s_per_model")}}
                if rows and "ft" in rows[0]:
                    for f in ("ft", "ft_one"):
                        s[f] = {st: _mean(r[f][st] for r in rows) for st in ft_steps}
                    for th in THRESHOLDS:
                        s[f"steps_to_{th}"] = steps_to(s["ft"], th)
                out.append(s)
            if variant == "heldout":
                for g in dict.fromkeys(r["generator"] for r in res["recon"] + res["novelty"]):
                    rec = [r for r in _select(res["recon"], variant, split) if r["generator"] == g]
                    nov = [r for r in _select(res["novelty"], variant, split) if r["generator"] == g]
                    out.append({"variant": variant, "method": g, "split": split, "table": "recon_novelty",
                                **{f: _mean(r[f] for r in rec) for f in ("orig", "recon")},
                                **{f: _mean(r[f] for r in nov) for f in ("ratio", "nearest_zoo_accuracy", "acc")}})
    for table, rows, field in (("support_sweep", res.get("support_sweep", []), "per_class"),
                               ("class_counts", res.get("class_counts", []), "num_classes")):
        for key in dict.fromkeys((r["variant"], r[field], r["method"]) for r in rows):
            sel = [r for r in rows if (r["variant"], r[field], r["method"]) == key]
            out.append({"table": table, "variant": key[0], field: key[1], "method": key[2], "tasks": len(sel),
                        "mean": _mean(r.get("mean") for r in sel), "best": _mean(r.get("best") for r in sel)})
    return out


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _curve(d) -> dict[int, float]:  # step keys are str after a JSON round trip
    return {int(k): v for k, v in (d or {}).items()}


def _steps(x):
    return ">100" if x is None else str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def _gap(r):
    return "–" if r.get("oracle") is None else f"{100 * (r['oracle'] - r['mean']):.1f}"


def format_tables(res: dict) -> str:
    """The report's markdown tables (means over tasks; accuracies in %)."""
    c = res["config"]
    ft = list(c["ft_steps"])[1:]
    summ = [r for r in res["summary"] if "table" not in r]
    body = []
    for r in (r for r in summ if r["variant"] == "heldout" and r["split"] != "all"):
        f, f1 = _curve(r.get("ft")), _curve(r.get("ft_one"))
        tail = ([f"{_pct(f1.get(10))} / {_pct(f1.get(50))}", _steps(r["steps_to_0.95"]), _steps(r["steps_to_0.975"])]
                if f else ["–"] * 3)
        secs = "–" if r.get("s_per_model") is None else f"{r['s_per_model']:.4f}"
        body.append([r["method"], r["split"], _pct(r["mean"]), _pct(r.get("best")), _pct(r.get("oracle")), _gap(r)]
                    + [_pct(f.get(s)) for s in ft] + tail + [secs])
    lines = [f"### Held-out tasks: zero-shot and fine-tuning (test accuracy %, n = {c['n']} samples, "
             f"{c['support_per_class']} support examples per class, {len(res['tasks']['set'])} + "
             f"{len(res['tasks'].get('tuple', []))} set + tuple tasks)", "",
             "`NAME` is the generator as `weightgen sample` runs it (closed-form head fitted on the support, declared "
             "in the manifest); `NAME/generated` is the pure generator; `ncm`, `lda`, `logreg` are the support-set "
             "rules; best-of-n is selected on the support only; gap = oracle best − mean.", ""]
    lines += _table(["method", "split", "0-step mean", "best-of-n (support-sel)", "oracle best", "gap"]
                    + [f"FT{s}" for s in ft]
                    + ["FT10 / FT50 (1 sample)", "steps to 95%", "steps to 97.5%", "s / model"], body)
    unseen = [v for v in UNSEEN if any(r["variant"] == v for r in summ)]
    if unseen:
        lines += ["", "### Unseen input distributions (never in the zoo, never tuned on): zero-shot, set + tuple "
                  "tasks pooled (test accuracy %, mean / best-of-n)", ""]
        methods = list(dict.fromkeys(r["method"] for r in summ if r["variant"] in unseen))
        get = {(r["variant"], r["method"]): r for r in summ if r["split"] == "all"}
        lines += _table(["method"] + [UNSEEN_TITLES[v] for v in unseen],
                        [[m] + [(f"{_pct(get[(v, m)]['mean'])} / {_pct(get[(v, m)].get('best'))}"
                                 if (v, m) in get else "–") for v in unseen] for m in methods])
    lines += _sweep_tables(res)
    rn = [r for r in res["summary"] if r.get("table") == "recon_novelty" and r["split"] != "all"]
    if rn:
        lines += ["", "### Autoencoder reconstruction of held-out scratch weights; novelty of samples", ""]
        lines += _table(["generator", "split", "scratch acc", "reconstructed acc", "ratio",
                         "novelty (NN dist / zoo NN dist)", "nearest zoo ckpt acc", "generated acc (mean)"],
                        [[r["method"], r["split"], _pct(r["orig"]), _pct(r["recon"]),
                          "–" if r["recon"] is None else f"{r['recon'] / max(r['orig'], 1e-8):.3f}",
                          "–" if r["ratio"] is None else f"{r['ratio']:.2f}", _pct(r["nearest_zoo_accuracy"]),
                          _pct(r["acc"])] for r in rn])
    if res["speed"]:
        ts = list(c["speed_threads"])
        lines += ["", f"### Sampling speed (models/s, batch {c['speed_n']}, this machine; pure generator / with the "
                  f"fitted head)", ""]
        lines += _table(["generator"] + [f"{t} torch thread(s)" for t in ts],
                        [[g] + [f"{s[f'models_per_s_{t}t']:.0f} / {s[f'fit_models_per_s_{t}t']:.0f}" for t in ts]
                         for g, s in res["speed"].items()])
    return "\n".join(lines) + "\n"


def _sweep_tables(res: dict) -> list[str]:
    lines = []
    for table, field, title in (("support_sweep", "per_class", "Support size: best-of-n test accuracy % against "
                                 "support examples per class (held-out class sets; scratch trained on the same "
                                 "examples)"),
                                ("class_counts", "num_classes", "Class counts the zoo never had (it has 5): "
                                 "best-of-n test accuracy %, 10 support examples per class")):
        rows = [r for r in res["summary"] if r.get("table") == table]
        for variant in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["variant"] == variant]
            cols = sorted(dict.fromkeys(r[field] for r in sel))
            get = {(r["method"], r[field]): r for r in sel}
            name = "" if table == "class_counts" else f" — {UNSEEN_TITLES.get(variant, 'held-out digits')}"
            lines += ["", f"### {title}{name}", ""]
            lines += _table(["method"] + [str(x) for x in cols],
                            [[m] + [_pct(get[(m, x)]["best"] if get[(m, x)]["best"] is not None else get[(m, x)]["mean"])
                                    if (m, x) in get else "–" for x in cols]
                             for m in dict.fromkeys(r["method"] for r in sel)])
    return lines


def write_report(results: dict, out_dir) -> Path:
    """OUT/report.md, OUT/results.json, OUT/ft_curves.png, OUT/novelty.png, OUT/support_size.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(f"# weightgen eval ({results['config']['arch']})\n\n" + format_tables(results))
    kinds = list(results["tasks"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for r in results["summary"]:
            if r["variant"] == "heldout" and r.get("split") == kind and "ft" in r:
                curve = _curve(r["ft"])
                ax.plot(sorted(curve), [100 * curve[s] for s in sorted(curve)], marker="o", label=r["method"])
            if r["variant"] == "heldout" and r.get("split") == kind and r["method"] == "scratch" and "table" not in r:
                ax.axhline(100 * r["mean"], color="gray", ls="--", lw=1, label="scratch (300 steps)")
        steps = list(results["config"]["ft_steps"])
        ax.set_xscale("symlog", linthresh=5)
        ax.set(title=f"held-out {kind}: fine-tuning from best-of-n", xlabel="full-batch Adam steps",
               ylabel="test accuracy (%)", ylim=(0, 100), xlim=(0, max(steps) * 1.1), xticks=steps, xticklabels=steps)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ft_curves.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in dict.fromkeys(r["generator"] for r in results["novelty"]):
        pts = [r for r in results["novelty"] if r["generator"] == g and r["ratio"] is not None]
        sc = ax.scatter([r["ratio"] for r in pts], [100 * r["acc"] for r in pts], label=f"{g}: samples (mean)")
        ax.scatter([r["ratio"] for r in pts], [100 * (r["nearest_zoo_accuracy"] or 0) for r in pts], facecolors="none",
                   edgecolors=sc.get_facecolor(), label=f"{g}: nearest zoo ckpt")
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set(xscale="log", xlabel="novelty (distance to nearest zoo ckpt / zoo NN distance)",
           ylabel="test accuracy (%)", title="accuracy vs novelty, per held-out task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "novelty.png", dpi=110)
    plt.close(fig)
    sweep = [r for r in results["summary"] if r.get("table") == "support_sweep"]
    variants = list(dict.fromkeys(r["variant"] for r in sweep))
    if variants:
        fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4.5), squeeze=False)
        for ax, v in zip(axes[0], variants):
            for m in dict.fromkeys(r["method"] for r in sweep if r["variant"] == v):
                pts = sorted((r["per_class"], r["best"] if r["best"] is not None else r["mean"]) for r in sweep
                             if r["variant"] == v and r["method"] == m)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=m)
            ax.set(xscale="log", title=f"{UNSEEN_TITLES.get(v, 'held-out digits')}: accuracy vs support size",
                   xlabel="support examples per class", ylabel="test accuracy (%)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "support_size.png", dpi=110)
        plt.close(fig)
    return out
