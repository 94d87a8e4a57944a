"""FSDP2 (``fully_shard``) on 2 gloo processes on this machine: sharded DLDR and CMD, OIALR.

Every worker compares its shard with an unsharded single-process reference trained on the same global
batches. Tolerances: the models are float64; the sharded and the single-process runs differ only in
summation order (FSDP averages the two half-batch gradients by a reduce-scatter; the Gram matrix, the
projections and the CMD sample are sums of per-rank partial sums), each a relative perturbation of a
few ulps (~1e-16) per operation, amplified by at most the 20 training steps and the conditioning of
the small eigenproblem / the CMD least squares. Measured differences stay below 1e-13; the tests allow
1e-10 (about 5e5 ulps), far below any real discrepancy (a wrong shard, a missing all-reduce or a
basis block of the wrong columns gives differences of order 1e-2 and more).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _ddp import run_workers  # noqa: E402

TOL = 1e-10


@pytest.fixture(scope="module")
def sharded_reports(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    return run_workers(
        "fsdp_sharded_worker.py", tmp_path_factory.mktemp("fsdp_sharded"), timeout=300
    )


def test_sharded_dldr_equals_single_process(sharded_reports):
    total_local = 0
    for rep in sharded_reports:
        assert rep["train_diff"] <= TOL, rep  # FSDP training itself matches the reference
        assert 0 < rep["local_entries"] < rep["global_entries"]  # each rank holds a part only
        total_local += rep["local_entries"]
        assert rep["snapshots"] == 8
        assert rep["basis_diff"] <= TOL, rep  # this rank's columns of the single-process basis
        assert rep["centre_diff"] <= TOL, rep
        for ev, ev_ref in zip(
            rep["explained_variance"], rep["explained_variance_ref"], strict=True
        ):
            assert ev == pytest.approx(ev_ref, rel=TOL, abs=0)
        assert rep["total_variance"] == pytest.approx(rep["total_variance_ref"], rel=TOL, abs=0)
        assert rep["coordinates_diff"] <= TOL, rep
        assert rep["subspace_sgd_diff"] <= TOL, rep
        assert rep["subspace_sgd_moved"] > 1e-3  # the subspace steps really moved the weights
        assert rep["bfgs_diff"] <= TOL, rep  # sharded SubspaceBFGS: the same steps
        assert rep["bfgs_H_diff"] <= TOL, rep
        assert rep["bfgs_updates"] == rep["bfgs_updates_ref"] >= 1, rep
        assert rep["bfgs_last_loss_ref"] < rep["bfgs_first_loss_ref"], rep
    assert total_local == sharded_reports[0]["global_entries"]  # the shards cover the model


def test_sharded_recorder_does_not_count_a_refused_recording(sharded_reports):
    for rep in sharded_reports:
        # every=2: the 2nd call is refused (NaN), its retry records
        assert rep["recorder_retry"] == [False, True, True, 1], rep


def test_sharded_methods_refuse_unsharded_input(sharded_reports):
    for rep in sharded_reports:
        assert rep["refused"] == [
            "ShardingError",
            "ParameterError",
            "ShapeError",
            "ShardingError",
            "CheckpointError",  # a content fault is a CheckpointError in every framework
        ], rep


def test_sharded_cmd_equals_single_process(sharded_reports):
    held = 0
    for rep in sharded_reports:
        assert rep["cmd_references"] == rep["cmd_references_ref"], rep
        assert rep["cmd_assignment_equal"], rep
        assert rep["cmd_profiles_diff"] <= TOL, rep
        assert rep["cmd_coef_diff"] <= TOL, rep
        assert rep["cmd_resume_equal"], rep  # a resumed shard state continues bit for bit
        assert rep["cmd_swapped_output_diff"] <= TOL, rep  # the whole model ran with CMD weights
        assert rep["cmd_restored_diff"] <= TOL, rep  # and got its trained weights back
        assert 0 < rep["cmd_sampled_held"] < rep["cmd_num_sampled"]  # the sample spans both ranks
        held += rep["cmd_references_held"]
    # the references come from both ranks (so the per-epoch all-reduce of their values is exercised)
    assert [r["cmd_references_held"] > 0 for r in sharded_reports] == [True, True]
    assert held == len(sharded_reports[0]["cmd_references"])


@pytest.mark.parametrize("budget", [False, True], ids=["rule", "budget"])
def test_oialr_under_fsdp2_matches_single_process_with_identical_factors(
    tmp_path, budget, monkeypatch
):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if budget:
        monkeypatch.setenv("FSDP_OIALR_BUDGET", "1")
    reports = run_workers("fsdp_oialr_worker.py", tmp_path, timeout=300)
    for rep in reports:
        assert rep["max_across_ranks"] == 0.0, rep  # the same factors on every rank, every step
        # the switch (by the stability rule) and the rank updates equal the unsharded OIALR's, with the
        # optimizer state carried the same way (otherwise the trajectories would part by far more)
        assert rep["switched"] == rep["switched_ref"] == {"0": 6, "2": 6}, rep
        assert rep["max_vs_reference"] <= TOL, rep
        assert rep["output_diff"] <= TOL, rep
        assert rep["share"] == pytest.approx(rep["share_ref"], rel=0, abs=0)
        assert rep["stability_events"] == 2 and rep["rank_events"] >= 4, rep
        assert rep["factors_sharded"] and rep["state_sharded"], rep  # re-sharded after every change
        assert rep["bases_frozen"] and rep["bases_not_in_optimizer"], rep
        assert rep["optimizer_holds_model_params"], rep  # no stale parameter left in the optimizer
        seen = [r["2"] for r in rep["ranks_seen"] if r]
        assert seen[0] == 24 and seen[-1] < 24  # a truncating update really changed a shape
    assert reports[0]["ranks_seen"] == reports[1]["ranks_seen"]
    for rep in reports:  # bad set-ups get a clear error naming the problem
        assert len(rep["refused"]) == 2, rep["refused"]
        assert "root module sharded with fully_shard" in rep["refused"][0]
        assert "0 is eligible for OIALR but not an FSDP unit of its own" in rep["refused"][1]


@pytest.mark.parametrize(
    "dense",
    [
        lambda: torch.nn.Linear(6, 5),
        lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
        lambda: torch.nn.Conv1d(3, 4, 2, bias=False),
    ],
)
def test_rebuilt_layer_is_the_same_layer_at_its_new_factors(dense):
    """FSDP rank updates rebuild each layer (a new FSDP unit): same kind, settings and function."""
    from lowrank_torch.convert import to_low_rank
    from lowrank_torch.fsdp_oialr import _rebuild

    torch.manual_seed(0)
    model = torch.nn.Sequential(dense())
    layer = to_low_rank(model, keep_last=False, min_aspect=0.0)["0"]
    layer.forward_mode = "factorized"
    U, S, V = (t.detach() for t in (layer.U, layer.sigma, layer.V))
    bias = None if layer.bias is None else layer.bias.detach()
    new = _rebuild(layer, U, S, V, bias)
    assert type(new) is type(layer) and new.forward_mode == "factorized"
    assert new.weight_shape == layer.weight_shape and new.groups == layer.groups
    spatial = len(new.weight_shape) - 2  # a conv: an input with channels and a spatial size
    if spatial:
        x = torch.randn(2, layer.weight_shape[1] * layer.groups, *([7] * spatial))
    else:
        x = torch.randn(2, layer.cols)
    torch.testing.assert_close(new(x), layer(x), rtol=0, atol=0)
    r = layer.rank - 1  # a smaller rank: the new layer holds the truncated factors
    small = _rebuild(layer, U[..., :r], S[..., :r, :r], V[..., :r], bias)
    assert small.rank == r and small.sigma.shape[-1] == r
