"""Where a run's model lies against the baselines, and where one draw lies among others.

A safety model is a point of two rates, harmful (not refused) and over-refusal
(benign prompts refused); either is bought with the other, so a model is better
only when it lies beyond the other's point or curve on that plane. SFT on the
seeds at growing training lengths (sft-seeds, then sft-matched-1..T, eval.sft_matched)
draws a curve: ISARA's model is "beyond" it when no point on the curve (its
segments included) is at least as good on both rates. "ISARA only trained
longer" is then ruled out for that run.

A draw is one run of a configuration with one generation seed. Runs of one
configuration scatter (EXPERIMENTS.md), so a draw is read against the others:
`fingerprint` names a configuration without its generation seed and run name,
`draw_row` reads a finished run's chosen model, `summary` aggregates draws as
mean and range.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import tomllib
from pathlib import Path

from loop.evaluation.validation import run_model
from loop.layout import RunLayout
from loop.state import RunState

RATES = ("harmful_rate", "over_refusal", "pairs_over_refusal", "pairs_harmful_rate", "degenerate_rate")
# What may differ between draws of one configuration.
# What may differ between draws of one configuration: the draw's name and seed, and which baselines are computed
# beside it (they don't change its model).
NOT_THE_CONFIGURATION = (("name",), ("runs_dir",), ("generation", "seed"), ("eval", "recorded_draws"),
                         ("eval", "sft_matched"), ("eval", "baselines"))


def mean_of_two(ev: dict) -> float | None:
    h, o = ev.get("harmful_rate"), ev.get("over_refusal")
    return None if h is None or o is None else (h + o) / 2


def dominated_by_curve(x: float, y: float, curve: list[tuple[float, float]]) -> bool:
    """True when some point of the piecewise-linear curve through `curve` (sorted by x) is at least as good on
    both rates as (x, y): harmful <= x and over-refusal <= y."""
    pts = sorted(curve)
    if not pts:
        return False
    candidates = [py for px, py in pts if px <= x]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):  # the curve where it crosses harmful = x
        if x0 <= x <= x1 and x1 > x0:
            candidates.append(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return bool(candidates) and min(candidates) <= y


def run_model_row(rows: list[dict]) -> dict | None:
    """The report's row of the run's model (`run_model`) among its evaluated iterations."""
    its = {r["t"]: r for r in rows if r["kind"] == "iteration" and r.get("eval")}
    t = run_model({t: r["held_out"]["score"] for t, r in its.items() if r.get("held_out")}, list(its))
    return its.get(t)


def sft_curve(rows: list[dict]) -> list[dict]:
    """SFT on the seeds at each training length, shortest first."""
    sft = [r for r in rows if r["kind"] == "baseline" and r["name"].startswith(("sft-seeds", "sft-matched-"))
           and mean_of_two(r.get("eval") or {}) is not None]
    return sorted(sft, key=lambda r: (r["name"] != "sft-seeds", int(r["name"].rpartition("-")[2])
                                      if r["name"] != "sft-seeds" else 0))


def verdict(rows: list[dict], iteration_steps: dict[int, int], matched_steps: dict[int, int] | None = None) -> str:
    """The report's words on the run's model against the training-matched SFT and ICL-kNN."""
    model = run_model_row(rows)
    if model is None or mean_of_two(model["eval"]) is None:
        return ""
    ev, t = model["eval"], model["t"]

    def point(r: dict) -> str:
        e = r["eval"]
        return (f"harmful {e['harmful_rate']:.0%}, over-refusal {e['over_refusal']:.0%} (mean {mean_of_two(e):.1%})"
                + (f", pairs' everyday halves refused {e['pairs_over_refusal']:.0%}"
                   if e.get("pairs_over_refusal") is not None else ""))

    lines = ["## The run's model against the baselines",
             f"The run's model, iteration {t} ({iteration_steps.get(t, '?')} optimizer steps in all): {point(model)}."]
    matched = next((r for r in rows if r["name"] == f"sft-matched-{t}"), None)
    if matched is not None and matched.get("eval"):
        better = mean_of_two(ev) < mean_of_two(matched["eval"])
        lines.append(f"SFT on the seeds alone, trained as long ({(matched_steps or {}).get(t, '?')} steps in all): "
                     f"{point(matched)}: ISARA's model is **{'better' if better else 'not better'}** on the mean.")
    curve = sft_curve(rows)
    if len(curve) >= 2:
        pts = [(r["eval"]["harmful_rate"], r["eval"]["over_refusal"]) for r in curve]
        beyond = not dominated_by_curve(ev["harmful_rate"], ev["over_refusal"], pts)
        lines.append(f"Against the SFT curve ({', '.join(r['name'] for r in curve)}): ISARA's model lies "
                     f"**{'beyond it' if beyond else 'on or inside it'}** (no SFT length is at least as good on "
                     f"both rates{'' if beyond else ': one is'}).")
    icl = next((r for r in rows if r["name"] == "icl-knn" and r.get("eval")), None)
    if icl is not None and mean_of_two(icl["eval"]) is not None:
        better = mean_of_two(ev) < mean_of_two(icl["eval"])
        lines.append(f"ICL-kNN: {point(icl)}: ISARA's model is **{'better' if better else 'not better'}** on "
                     "the mean.")
    lines.append("One draw: where runs of one configuration scatter, read it against the others "
                 "(`isara run CONFIG --draws N`).")
    return "\n\n".join(lines) + "\n"


# --- draws ---------------------------------------------------------------------------

def configuration(config_toml: Path) -> dict:
    """The run's resolved configuration without what may differ between its draws."""
    cfg = tomllib.loads(config_toml.read_text(encoding="utf-8"))
    for path in NOT_THE_CONFIGURATION:
        node = cfg
        for key in path[:-1]:
            node = node.get(key, {})
        node.pop(path[-1], None)
    return cfg


def fingerprint(config_toml: Path) -> str:
    return hashlib.sha256(json.dumps(configuration(config_toml), sort_keys=True).encode()).hexdigest()[:16]


def same_configuration(recorded: dict, run: dict) -> bool:
    """Every setting the recorded draws were made with has the run's value. A key the recorded configuration
    lacks is one added to the schema since: it had its default then, and is not compared."""
    for key, value in recorded.items():
        if isinstance(value, dict):
            if not isinstance(run.get(key), dict) or not same_configuration(value, run[key]):
                return False
        elif run.get(key) != value:
            return False
    return True


def draw_row(run_dir: Path, rows: list[dict]) -> dict | None:
    """A run's chosen model (among its report rows) as one row of a draws table; None before its first evaluated
    iteration."""
    model = run_model_row(rows)
    if model is None:
        return None
    cfg = tomllib.loads(RunLayout(run_dir).config.read_text(encoding="utf-8"))
    finished = [p.get("finished", "") for p in RunState(run_dir).data["phases"].values()]
    return {"run": run_dir.name, "generation_seed": cfg.get("generation", {}).get("seed", 0),
            "iteration": model["t"], **{k: model["eval"].get(k) for k in RATES},
            "date": max(finished, default="")[:10] or time.strftime("%Y-%m-%d"), "commit": _commit()}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)} if values else {}


def summary(rows: list[dict]) -> dict:
    """Mean and range of each rate (and of the mean of harmful and over-refusal) over the draws."""
    out = {k: spread([r[k] for r in rows if r.get(k) is not None]) for k in RATES}
    out["mean_of_two"] = spread([m for r in rows if (m := mean_of_two(r)) is not None])
    return out


def where_it_falls(row: dict, recorded: dict) -> str:
    """One paragraph: this draw beside the recorded draws of its configuration."""
    draws = recorded.get("draws", [])
    if not draws:
        return ""
    s = summary(draws)
    parts = []
    for key, name in (("harmful_rate", "harmful"), ("over_refusal", "over-refusal"),
                      ("pairs_over_refusal", "pairs' everyday halves refused")):
        if row.get(key) is None or not s[key]:
            continue
        v, sp = row[key], s[key]
        place = "below the range" if v < sp["min"] else "above the range" if v > sp["max"] else "within the range"
        parts.append(f"{name} {v:.0%} ({place}; recorded mean {sp['mean']:.0%}, {sp['min']:.0%}-{sp['max']:.0%})")
    runs = ", ".join(f"{d['run']} ({d.get('date', '?')}, {d.get('commit') or '?'})" for d in draws)
    return (f"## This draw among the recorded ones\n\nThis draw's model (iteration {row['iteration']}): "
            + "; ".join(parts) + f". Recorded draws of this configuration: {runs}. Over them, against the "
            "baselines (SFT on the seeds trained as long as each iteration among them):\n\n"
            + comparison({"draws": draws, "summary": s, "baselines": recorded.get("baselines", {})}))


def recorded_draws(run_dir: Path) -> dict | None:
    """The recorded draws the run's configuration names (eval.recorded_draws), when they are of its
    configuration; None otherwise."""
    layout = RunLayout(run_dir)
    try:
        cfg = tomllib.loads(layout.config.read_text(encoding="utf-8"))
        path = cfg.get("eval", {}).get("recorded_draws")
        if not path:
            return None
        recorded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = same_configuration(recorded.get("configuration") or {"missing": True}, configuration(layout.config))
    return recorded if ok else None


def copy_baselines(src: Path, dst: Path) -> list[str]:
    """Give run `dst` the finished baselines of run `src` (the same configuration but its generation seed: the
    baselines don't depend on it): their files, hard-linked where the file system allows, and their state
    entries, so `dst` skips them. Returns the phases given."""
    import os
    import shutil

    src_state = RunState(src)
    given = [p for p in src_state.data["phases"] if p.startswith("baselines/")]
    if not given:
        return []
    for path in sorted((src / "baselines").rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists() and ".tmp" not in path.name:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
    state = RunState(dst)
    for p in given:
        state.data["phases"].setdefault(p, src_state.data["phases"][p])
    state.save()
    return given


def comparison(data: dict) -> str:
    """ISARA's draws against each baseline on the mean of harmful and over-refusal: beyond a baseline when
    lower by more than the draws' spread (max - min)."""
    s = data["summary"].get("mean_of_two")
    if not s:
        return ""
    width = s["max"] - s["min"]
    lines = [f"ISARA over the draws: mean of harmful and over-refusal {s['mean']:.1%} (range {s['min']:.1%}-"
             f"{s['max']:.1%}, spread {width:.1%})."]
    for name, ev in data["baselines"].items():
        m = mean_of_two(ev)
        if m is None:
            continue
        gap = m - s["mean"]
        word = "beyond it by more than the spread" if gap > width else "better, within the spread" if gap > 0 \
            else "not better"
        lines.append(f"- {name}: {m:.1%}: ISARA is {word} ({gap * 100:+.1f} points).")
    matched = [(r, data["baselines"].get(f"sft-matched-{r['iteration']}")) for r in data["draws"]]
    pairs = [(mean_of_two(r), mean_of_two(b)) for r, b in matched if b and mean_of_two(b) is not None]
    if pairs:
        wins = sum(a < b for a, b in pairs)
        lines.append(f"- against SFT on the seeds trained as long as the draw's own model: better in {wins} of "
                     f"{len(pairs)} draws.")
    return "\n".join(lines) + "\n"
