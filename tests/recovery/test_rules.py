"""The rule choice from the membership, for every stage position and stage count."""

from __future__ import annotations

import itertools

import pytest

from lowcomm.recovery import (
    Membership,
    RecoveryConfig,
    Rule,
    Source,
    choose_rule,
    lr_scale,
    plan_recovery,
    swap_partner,
)

PLUS = RecoveryConfig(checkfree_plus=True)
PLAIN = RecoveryConfig()


def _expected_single_loss(stage: int, n: int, plus: bool) -> tuple[Rule, tuple[Source, ...]]:
    """The rule for one lost stage with every other stage alive, written from the paper's cases."""
    if stage == 0:
        return (Rule.CHECKFREE_PLUS, (Source("backup", 1),)) if plus else _checkpoint(0)
    if 1 < stage < n:
        return Rule.CHECKFREE, (Source("neighbour", stage - 1), Source("neighbour", stage + 1))
    if plus and n >= 4:
        partner = 2 if stage == 1 else n - 1
        return Rule.CHECKFREE_PLUS, (Source("neighbour", partner),)
    return _checkpoint(stage)


def _checkpoint(stage: int) -> tuple[Rule, tuple[Source, ...]]:
    return Rule.CHECKPOINT, (Source("checkpoint", stage),)


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("plus", [False, True])
def test_one_lost_stage_gets_the_rule_of_its_position_for_every_stage_count(
    n: int, plus: bool
) -> None:
    config = PLUS if plus else PLAIN
    rules = set()
    for stage in range(n + 1):
        plan = choose_rule(stage, Membership(num_block_stages=n, lost=frozenset({stage})), config)
        assert (plan.rule, plan.sources) == _expected_single_loss(stage, n, plus), (n, stage)
        rules.add(plan.rule)
    assert Rule.CHECKFREE_PLUS in rules if plus else Rule.CHECKFREE_PLUS not in rules


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("plus", [False, True])
def test_no_plan_ever_reads_a_lost_stage_and_adjacent_losses_fall_back_to_the_checkpoint(
    n: int, plus: bool
) -> None:
    config = PLUS if plus else PLAIN
    stages = range(n + 1)
    for k in (1, 2, 3):
        for lost in itertools.combinations(stages, k):
            membership = Membership(num_block_stages=n, lost=frozenset(lost))
            plans = plan_recovery(membership, config)
            assert [p.stage for p in plans] == sorted(lost)
            for plan in plans:
                for source in plan.sources:
                    if source.kind != "checkpoint":
                        assert source.index not in lost, (lost, plan)
                if plan.rule is Rule.CHECKFREE:
                    assert 1 < plan.stage < n
            # Two adjacent block stages lost together: a middle one cannot be averaged.
            for a, b in itertools.pairwise(sorted(lost)):
                if b == a + 1 and a >= 1 and 1 < b < n:
                    assert plans[sorted(lost).index(b)].rule is not Rule.CHECKFREE


def test_the_choice_depends_on_the_membership_only_not_on_the_order_peers_list_it() -> None:
    a = Membership(num_block_stages=6, lost=frozenset([5, 3, 0]), replicas={3: (2, 1)})
    b = Membership(num_block_stages=6, lost=frozenset([0, 3, 5]), replicas={3: (1, 2)})
    assert plan_recovery(a, PLUS) == plan_recovery(b, PLUS)
    assert plan_recovery(a, PLUS)[1].sources == (Source("replica", 1),)


def test_a_surviving_replica_is_copied_even_where_checkfree_would_apply() -> None:
    membership = Membership(num_block_stages=4, lost=frozenset({2}), replicas={2: (3,)})
    plan = choose_rule(2, membership, PLAIN)
    assert plan.rule is Rule.REPLICA and plan.sources == (Source("replica", 3),)
    # A neighbour that lost a peer but kept a replica is still a source for CheckFree.
    membership = Membership(num_block_stages=4, lost=frozenset({1, 2}), replicas={1: (0,)})
    assert choose_rule(2, membership, PLAIN).rule is Rule.CHECKFREE


def test_the_embedding_is_copied_from_a_live_backup_holder_else_from_the_checkpoint() -> None:
    n = 5
    lost_with_first = Membership(num_block_stages=n, lost=frozenset({0, 1}))
    assert choose_rule(0, lost_with_first, PLUS).sources == (Source("backup", n),)
    both_holders = Membership(num_block_stages=n, lost=frozenset({0, 1, n}))
    assert choose_rule(0, both_holders, PLUS).rule is Rule.CHECKPOINT
    no_backup = Membership(num_block_stages=n, lost=frozenset({0}), embedding_backups=frozenset())
    assert choose_rule(0, no_backup, PLUS).rule is Rule.CHECKPOINT


def test_an_edge_stage_whose_swap_partner_is_lost_too_falls_back_to_the_checkpoint() -> None:
    membership = Membership(num_block_stages=8, lost=frozenset({7, 8}))
    assert [p.rule for p in plan_recovery(membership, PLUS)] == [Rule.CHECKPOINT] * 2
    assert swap_partner(8, 8) == 7 and swap_partner(4, 8) is None and swap_partner(1, 3) is None


def test_membership_rejects_stages_outside_the_pipeline() -> None:
    with pytest.raises(ValueError, match="outside"):
        Membership(num_block_stages=4, lost=frozenset({5}))
    with pytest.raises(ValueError, match="stage must be"):
        choose_rule(9, Membership(num_block_stages=4, lost=frozenset()), PLAIN)


def test_the_lr_boost_decays_linearly_back_to_the_base_rate() -> None:
    config = RecoveryConfig(lr_boost=1.2, lr_boost_decay_steps=100)
    assert lr_scale(None, config) == 1.0
    assert lr_scale(0, config) == pytest.approx(1.2)
    assert lr_scale(50, config) == pytest.approx(1.1)
    assert lr_scale(100, config) == 1.0 and lr_scale(10_000, config) == 1.0
    scales = [lr_scale(t, config) for t in range(120)]
    assert all(a >= b for a, b in itertools.pairwise(scales))


def test_the_reference_permanent_boost_never_decays() -> None:
    config = RecoveryConfig(lr_boost=1.1, lr_boost_permanent=True)
    assert [lr_scale(t, config) for t in (0, 99, 100, 10**6)] == [pytest.approx(1.1)] * 4
    assert lr_scale(None, config) == 1.0


def test_config_rejects_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match="lr_boost"):
        RecoveryConfig(lr_boost=0.9)
    with pytest.raises(ValueError, match="norm_point"):
        RecoveryConfig(norm_point="later")  # type: ignore[arg-type]
