"""Stage plans: the exact DT1-DT4 definitions, orders and fingerprints."""

from __future__ import annotations

import pytest

from hf_tuning import PartitionError, build_stage_plan, partition_subspaces
from tests.helpers.tiny import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=8)


def groups_per_stage(plan):
    return [list(stage.groups) for stage in plan.stages]


def test_exact_stage_definitions(model):
    assert groups_per_stage(build_stage_plan(model, "ost")) == [["all"]]
    assert groups_per_stage(build_stage_plan(model, "dt1")) == [["G0"], ["G1"], ["G2"], ["G3"]]
    assert groups_per_stage(build_stage_plan(model, "dt2")) == [
        ["G0"],
        ["G0", "G1"],
        ["G0", "G1", "G2"],
        ["G0", "G1", "G2", "G3"],
    ]
    assert [s.name for s in build_stage_plan(model, "dt2").stages] == ["G0", "G0+G1", "G0+G1+G2", "all"]
    assert groups_per_stage(build_stage_plan(model, "dt3")) == [["even"], ["odd"]]
    assert groups_per_stage(build_stage_plan(model, "dt4")) == [["even"], ["even", "odd"]]


def test_stage_params_are_group_plus_always(model):
    part = partition_subspaces(model, "adjacent")
    plan = build_stage_plan(part, "dt1")
    everything = {n for n, _ in model.named_parameters()}
    for stage, group in zip(plan.stages, part.groups):
        assert set(stage.params) == set(group.params) | set(part.always_trainable)
        assert stage.num_params == sum(part.param_numel[n] for n in stage.params)
    assert set(build_stage_plan(part, "dt2").stages[-1].params) == everything
    assert set(build_stage_plan(model, "dt4").stages[-1].params) == everything
    assert set(build_stage_plan(model, "ost").stages[0].params) == everything


def test_orders(model):
    reverse = build_stage_plan(model, "dt1", order="reverse")
    assert [s.name for s in reverse.stages] == ["G3", "G2", "G1", "G0"]
    assert [s.name for s in build_stage_plan(model, "dt2", order="reverse").stages] == [
        "G3",
        "G3+G2",
        "G3+G2+G1",
        "all",
    ]
    assert [s.name for s in build_stage_plan(model, "dt3", order="reverse").stages] == ["odd", "even"]
    draws = {
        tuple(s.name for s in build_stage_plan(model, "dt1", order="random", seed=seed).stages) for seed in range(8)
    }
    assert all(sorted(d) == ["G0", "G1", "G2", "G3"] for d in draws)
    assert len(draws) > 1  # the seed matters
    again = build_stage_plan(model, "dt1", order="random", seed=3)
    assert again.stages == build_stage_plan(model, "dt1", order="random", seed=3).stages
    with pytest.raises(ValueError, match="unknown dt_order"):
        build_stage_plan(model, "dt1", order="sideways")


def test_num_groups_and_fingerprint(model):
    six = build_stage_plan(model, "dt1", num_groups=8)
    assert len(six) == 8
    assert six.fingerprint != build_stage_plan(model, "dt1").fingerprint
    assert build_stage_plan(model, "dt1").fingerprint == build_stage_plan(model, "dt1").fingerprint
    assert build_stage_plan(model, "dt3").to_dict()["partition"]["groups"][0]["name"] == "even"


def test_errors(model):
    with pytest.raises(ValueError, match="unknown DT variant 'dt9'"):
        build_stage_plan(model, "dt9")
    with pytest.raises(PartitionError, match="uses the cross partition"):
        build_stage_plan(partition_subspaces(model, "adjacent"), "dt3")
    with pytest.raises(PartitionError, match="at least 2 subspaces"):
        build_stage_plan(model, "dt1", num_groups=1)
    with pytest.raises(PartitionError, match="more than the 8 blocks"):
        build_stage_plan(model, "dt1", num_groups=9)
