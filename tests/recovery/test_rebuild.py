"""Each rule's rebuilt state against a plain-torch reference, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from lowcomm.recovery import (
    GradNorm,
    Membership,
    RecoveryConfig,
    Rule,
    Source,
    StageSnapshot,
    average_states,
    choose_rule,
    clip_and_measure,
    neighbour_weights,
    rebuild,
)
from lowcomm.recovery.stages import BlockStage, EmbeddingStage, StageConfig, init_stage_

CONFIG = StageConfig(num_block_stages=4, width=16, num_heads=2, context=8)


def _stage(seed: int) -> BlockStage:
    stage = BlockStage(CONFIG)
    init_stage_(stage, CONFIG, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mix shows
        for p in stage.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 99)) * 0.1)
    return stage


def _trained_optimizer(stage: torch.nn.Module) -> torch.optim.Adam:
    opt = torch.optim.Adam(stage.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        stage(
            torch.randn(2, CONFIG.context, CONFIG.width, generator=torch.Generator().manual_seed(5))
        ).square().mean().backward()
        opt.step()
    return opt


def _assert_equal_and_changed(
    rebuilt: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    lost: dict[str, torch.Tensor],
) -> None:
    assert rebuilt.keys() == reference.keys() == lost.keys()
    for name in reference:
        assert torch.equal(rebuilt[name], reference[name]), name
    assert any(not torch.equal(rebuilt[n], lost[n]) for n in lost)


def _checkfree(norm_point: str, norms: tuple[GradNorm, GradNorm]) -> None:
    prev, lost, nxt = _stage(1), _stage(2), _stage(3)
    lost_state = copy.deepcopy(lost.state_dict())
    config = RecoveryConfig(norm_point=norm_point)  # type: ignore[arg-type]
    plan = choose_rule(2, Membership(num_block_stages=4, lost=frozenset({2})), config)
    assert plan.rule is Rule.CHECKFREE
    snapshots = {
        Source("neighbour", 1): StageSnapshot(prev.state_dict(), grad_norm=norms[0]),
        Source("neighbour", 3): StageSnapshot(nxt.state_dict(), grad_norm=norms[1]),
    }
    out = rebuild(plan, snapshots, config)
    pick = (lambda g: g.before_clip) if norm_point == "before_clip" else (lambda g: g.after_clip)
    w_prev, w_next = pick(norms[0]) + 1e-4, pick(norms[1]) + 1e-4
    reference = {
        name: (w_next * nxt.state_dict()[name] + w_prev * p) / (w_next + w_prev)
        for name, p in prev.state_dict().items()
    }
    _assert_equal_and_changed(out.params, reference, lost_state)
    assert out.optimizer is None and out.lr_boost
    assert out.report.weights == (w_prev, w_next)
    assert out.report.sources == ("neighbour:1", "neighbour:3")
    nbytes = sum(t.numel() * 4 for t in prev.state_dict().values())
    assert out.report.bytes == 2 * nbytes and out.report.seconds >= 0


def test_checkfree_is_the_gradient_norm_weighted_average_measured_before_clipping() -> None:
    _checkfree("before_clip", (GradNorm(3.0, 1.0), GradNorm(0.5, 0.5)))


def test_checkfree_after_clipping_is_the_reference_option() -> None:
    _checkfree("after_clip", (GradNorm(3.0, 1.0), GradNorm(0.5, 0.5)))


def test_after_clipping_the_weights_collapse_to_a_plain_average_when_both_neighbours_clip() -> None:
    norms = GradNorm(7.0, 1.0), GradNorm(2.0, 1.0)
    after = neighbour_weights(*norms, RecoveryConfig(norm_point="after_clip"))
    before = neighbour_weights(*norms, RecoveryConfig())
    assert after[0] == after[1]
    assert before[0] / before[1] == pytest.approx(7.0001 / 2.0001)
    assert neighbour_weights(*norms, RecoveryConfig(average="uniform")) == (1.0, 1.0)


def test_clip_and_measure_clips_as_torch_does_and_reads_both_norms() -> None:
    a, b = _stage(1), _stage(1)
    for stage in (a, b):
        stage(torch.ones(2, CONFIG.context, CONFIG.width)).sum().mul(50).backward()
    norm = clip_and_measure(a.parameters(), 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert norm.before_clip == float(torch_norm) and norm.before_clip > 1.0
    assert norm.after_clip == pytest.approx(1.0, rel=1e-4)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]


def test_average_states_rejects_stages_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="differ"):
        average_states({"w": torch.ones(2)}, {"v": torch.ones(2)}, weights=(1.0, 1.0))


@pytest.mark.parametrize("stage_index", [1, 4])
def test_checkfree_plus_copies_the_swap_partner_with_fresh_optimizer_state(
    stage_index: int,
) -> None:
    partner, lost = _stage(7), _stage(8)
    lost_state = copy.deepcopy(lost.state_dict())
    config = RecoveryConfig(checkfree_plus=True)
    plan = choose_rule(
        stage_index, Membership(num_block_stages=4, lost=frozenset({stage_index})), config
    )
    assert plan.rule is Rule.CHECKFREE_PLUS
    out = rebuild(plan, {plan.sources[0]: StageSnapshot(partner.state_dict())}, config)
    _assert_equal_and_changed(out.params, dict(partner.state_dict()), lost_state)
    assert out.optimizer is None and out.lr_boost
    # A copy, not a view: training the rebuilt stage must not move the partner.
    next(iter(out.params.values())).add_(1.0)
    assert not torch.equal(
        next(iter(out.params.values())), next(iter(partner.state_dict().values()))
    )


def test_checkfree_plus_restores_the_embedding_from_the_backup_a_neighbour_holds() -> None:
    embedding = EmbeddingStage(CONFIG)
    init_stage_(embedding, CONFIG, generator=torch.Generator().manual_seed(11))
    backup = copy.deepcopy(embedding.state_dict())
    with torch.no_grad():
        for p in embedding.parameters():
            p.fill_(float("nan"))  # the lost stage
    config = RecoveryConfig(checkfree_plus=True)
    plan = choose_rule(0, Membership(num_block_stages=4, lost=frozenset({0, 1})), config)
    assert plan.sources == (Source("backup", 4),)
    out = rebuild(plan, {plan.sources[0]: StageSnapshot(backup)}, config)
    for name, t in backup.items():
        assert torch.equal(out.params[name], t)
    embedding.load_state_dict(out.params)
    assert all(torch.isfinite(p).all() for p in embedding.parameters())


@pytest.mark.parametrize("rule", [Rule.REPLICA, Rule.CHECKPOINT])
def test_replica_and_checkpoint_copy_parameters_and_optimizer_state(rule: Rule) -> None:
    source, lost = _stage(21), _stage(22)
    opt = _trained_optimizer(source)
    lost_state = copy.deepcopy(lost.state_dict())
    if rule is Rule.REPLICA:
        membership = Membership(num_block_stages=4, lost=frozenset({2}), replicas={2: (1,)})
    else:
        membership = Membership(num_block_stages=4, lost=frozenset({2, 3}))
    plan = choose_rule(2, membership, RecoveryConfig())
    assert plan.rule is rule
    snapshot = StageSnapshot(source.state_dict(), opt.state_dict())
    out = rebuild(plan, {plan.sources[0]: snapshot}, RecoveryConfig())
    _assert_equal_and_changed(out.params, dict(source.state_dict()), lost_state)
    assert not out.lr_boost and out.optimizer is not None
    # The copied optimizer state, loaded into the rebuilt stage, steps exactly like the source's.
    lost.load_state_dict(out.params)
    new_opt = torch.optim.Adam(lost.parameters(), lr=1e-3)
    new_opt.load_state_dict(out.optimizer)
    for stage, o in ((source, opt), (lost, new_opt)):
        o.zero_grad()
        stage(torch.ones(1, CONFIG.context, CONFIG.width)).sum().backward()
        o.step()
    for p, q in zip(source.parameters(), lost.parameters(), strict=True):
        assert torch.equal(p, q)
    assert out.report.bytes > sum(t.numel() * 4 for t in source.state_dict().values())


def test_rebuild_without_its_sources_raises() -> None:
    plan = choose_rule(2, Membership(num_block_stages=4, lost=frozenset({2})), RecoveryConfig())
    with pytest.raises(ValueError, match="lacks sources"):
        rebuild(plan, {}, RecoveryConfig())
