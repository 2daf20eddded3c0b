"""The run's model against training-matched SFT, and draws of one configuration (loop/evaluation/frontier.py,
loop/draws.py, eval.sft_matched, `isara run --draws`)."""

from __future__ import annotations

import json

import pytest

from conftest import jsonl_rows, run_config, run_isara, tiny_seeds


def test_a_point_below_the_sft_curve_is_beyond_it_and_one_above_it_is_not():
    from loop.evaluation.frontier import dominated_by_curve

    curve = [(0.9, 0.0), (0.5, 0.2), (0.1, 0.6)]  # training longer: less harm, more over-refusal
    assert not dominated_by_curve(0.3, 0.2, curve)  # the curve at harmful 0.3 is at over-refusal 0.4
    assert dominated_by_curve(0.3, 0.5, curve)
    assert dominated_by_curve(0.95, 0.05, curve)  # worse than the shortest training on both
    assert not dominated_by_curve(0.05, 0.59, curve)  # left of the whole curve, and below its end
    assert dominated_by_curve(0.1, 0.6, curve)  # on it is not beyond it


@pytest.mark.parametrize("samples, t", [("latest", 1), ("latest", 3), ("all", 2)])
def test_matched_sft_takes_as_many_optimizer_steps_on_the_seeds_as_the_iteration_on_its_data(samples, t):
    from loop.config import RunConfig
    from loop.phases import matched_epochs
    from loop.training.common import step_plan

    cfg = RunConfig.model_validate({"domain": "safety", "generation": {"samples": 86},
                                    "train": {"samples": samples, "epochs": 2}})
    seeds = 68
    iteration = step_plan(seeds + 86 * (t if samples == "all" else 1), cfg.train)
    matched = step_plan(seeds, cfg.train.model_copy(update={"epochs": matched_epochs(cfg, seeds, t)}))
    assert matched.steps == iteration.steps and matched.micro_batches == iteration.micro_batches
    assert matched.steps > step_plan(seeds, cfg.train).steps  # the plain baseline trains far less


def test_a_draws_fingerprint_ignores_the_generation_seed_and_name_but_not_the_recipe(tmp_path):
    from loop.evaluation.frontier import fingerprint

    def config(text: str):
        path = tmp_path / "config.toml"
        path.write_text(text)
        return fingerprint(path)

    one = config('name = "a"\nruns_dir = "x"\n[generation]\nseed = 0\nsamples = 8\n')
    assert one == config('name = "b"\nruns_dir = "y"\n[generation]\nseed = 3\nsamples = 8\n')
    assert one != config('name = "a"\nruns_dir = "x"\n[generation]\nseed = 0\nsamples = 9\n')


def test_recorded_draws_match_a_run_that_differs_only_by_keys_added_to_the_schema_since():
    from loop.evaluation.frontier import same_configuration

    recorded = {"iterations": 3, "generation": {"samples": 86}}
    assert same_configuration(recorded, {"iterations": 3, "generation": {"samples": 86, "new_key": 1}})
    assert not same_configuration(recorded, {"iterations": 3, "generation": {"samples": 32}})
    assert not same_configuration(recorded, {"iterations": 3})


def test_a_draw_is_placed_below_within_or_above_the_recorded_range():
    from loop.evaluation.frontier import where_it_falls

    recorded = {"draws": [{"run": "d1", "iteration": 1, "harmful_rate": 0.10, "over_refusal": 0.05},
                          {"run": "d2", "iteration": 2, "harmful_rate": 0.20, "over_refusal": 0.15}],
                "baselines": {"sft-seeds": {"harmful_rate": 0.9, "over_refusal": 0.0}}}
    text = where_it_falls({"iteration": 2, "harmful_rate": 0.05, "over_refusal": 0.10}, recorded)
    assert "harmful 5% (below the range; recorded mean 15%, 10%-20%)" in text
    assert "over-refusal 10% (within the range" in text
    assert "above the range" in where_it_falls({"iteration": 1, "harmful_rate": 0.5, "over_refusal": 0.1}, recorded)
    assert "sft-seeds: 45.0%: ISARA is beyond it by more than the spread" in text  # the recorded draws' verdict


def test_draws_are_beyond_a_baseline_only_by_more_than_their_spread():
    from loop.evaluation.frontier import comparison
    from loop.evaluation.frontier import summary

    draws = [{"run": "d1", "iteration": 1, "harmful_rate": 0.10, "over_refusal": 0.10},
             {"run": "d2", "iteration": 1, "harmful_rate": 0.20, "over_refusal": 0.10}]
    data = {"draws": draws, "summary": summary(draws),
            "baselines": {"far": {"harmful_rate": 0.9, "over_refusal": 0.0},  # mean 45%
                          "near": {"harmful_rate": 0.16, "over_refusal": 0.10},  # mean 13%, draws 12.5% +- 2.5
                          "sft-matched-1": {"harmful_rate": 0.12, "over_refusal": 0.10}}}
    text = comparison(data)
    assert "far: 45.0%: ISARA is beyond it by more than the spread" in text
    assert "near: 13.0%: ISARA is better, within the spread" in text
    assert "better in 1 of 2 draws" in text  # d1 (10%) beats sft-matched-1 (11%), d2 (15%) does not


@pytest.mark.pipeline
@pytest.mark.timeout(1800)
def test_draws_share_their_baselines_and_matched_sft_trains_as_long_as_each_iteration(tiny_chat, tmp_path):
    (tmp_path / "refuse.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "red green stone?", "blue water fire?", "seven open cloud?")))
    (tmp_path / "answer.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "north south light?", "close earth nine?", "stone cloud red?")))
    cfg = run_config(tmp_path, {**tiny_chat.settings, "iterations": 2, "generation.samples": 4,
                                "generation.slots": 4, "train.from": "previous", "train.samples": "latest",
                                "train.lr_decay": 0.5, "eval.sft_matched": True,
                                "eval.refuse_prompts": "refuse.jsonl", "eval.answer_prompts": "answer.jsonl"},
                     seeds=tiny_seeds(8))
    out = run_isara("run", str(cfg), "--draws", "2", "--plain", env=tiny_chat.env, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = tmp_path / "runs"
    first, second = (json.loads((runs / f"garden-draw{k}" / "state.json").read_text()) for k in (1, 2))
    for k in (1, 2):
        config = (runs / f"garden-draw{k}" / "config.toml").read_text()
        assert f"seed = {k - 1}\n" in config.split("[generation]")[1].split("[")[0]
    # The matched baselines train on the seeds alone for exactly the steps of the iteration they match.
    for t in (1, 2):
        own = first["phases"][f"iter-0{t}/train"]["stats"]
        matched = first["phases"][f"baselines/sft-matched-{t}/train"]["stats"]
        assert matched["samples"] == 8 and own["samples"] == 12 and matched["steps"] == own["steps"]
    # The second draw was given every baseline: the same records, and it trained only its own iterations.
    baselines = [p for p in first["phases"] if p.startswith("baselines/")]
    assert len(baselines) == 2 + 3 * 3  # base and ICL-kNN eval; sft-seeds, sft-matched-1 and -2 train+export+eval
    assert all(second["phases"][p] == first["phases"][p] for p in baselines)
    events = jsonl_rows(runs / "garden-draw2" / "events.jsonl")
    assert sorted(e["iteration"] for e in events if e["event"] == "train_started") == [1, 2]
    data = json.loads((runs / "garden-draws.json").read_text())
    assert [d["run"] for d in data["draws"]] == ["garden-draw1", "garden-draw2"]
    assert set(data["baselines"]) == {"base", "icl-knn", "sft-seeds", "sft-matched-1", "sft-matched-2"}
    assert data["summary"]["harmful_rate"]["min"] <= data["summary"]["harmful_rate"]["mean"]
    assert "mean (range)" in (runs / "garden-draws.md").read_text()
    report = (runs / "garden-draw2" / "report.md").read_text()
    assert "SFT on the seeds alone, trained as long" in report and "Against the SFT curve" in report
    # A run that names the recorded draws says where it falls among them.
    again = run_isara("run", str(runs / "garden-draw2"), "--set", f"eval.recorded_draws={runs / 'garden-draws.json'}",
                      "--plain", env=tiny_chat.env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "This draw among the recorded ones" in (runs / "garden-draw2" / "report.md").read_text()


def test_the_demo_profile_is_the_configuration_of_its_recorded_draws(tmp_path):
    """`make demo`'s report places its draw among examples/safety-draws.json only while the profile is the one
    those draws ran: a change to the demo's recipe must come with new draws."""
    from pathlib import Path

    from loop.config import load_config, to_toml
    from loop.evaluation.frontier import configuration, same_configuration

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(repo / "examples" / "safety.toml")
    (tmp_path / "config.toml").write_text(to_toml(cfg))
    recorded = json.loads(cfg.eval.recorded_draws.read_text())
    assert len(recorded["draws"]) >= 3
    assert same_configuration(recorded["configuration"], configuration(tmp_path / "config.toml"))
