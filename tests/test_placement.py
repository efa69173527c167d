"""Control-plane policies: placement (`ours` and baselines), GPU-memory and NIC ledgers.

The worked examples use the end-to-end testbed of PAPER.md section 9: 2 servers with 4 A10 GPUs
and a 64 Gbps NIC, 4 servers with 4 V100 32 GB GPUs and a 16 Gbps NIC. An A10 has 24 GB of
which 22 GB are usable (PAPER.md section 9, cold-start testbed); we use 22 GB.
"""
from __future__ import annotations

import dataclasses
import math

import pytest

from hydraserve.control.gpu import GpuLedger
from hydraserve.control.network import NicLedger, claim_gbits, fetch_deadline
from hydraserve.control.placement import (
    POLICIES,
    PolicyName,
    place_cached,
    place_naive,
    place_ours,
    place_static,
    predict_ttft_ms,
    tpot_rate,
)
from hydraserve.control.snapshot import (
    GPU,
    ModelInfo,
    NodeSnapshot,
    PlacementRequest,
    stage_size_gb,
)

A10_GB = 22.0  # usable memory of a 24 GB A10
V100_GB = 32.0

LLAMA7 = ModelInfo("llama-2-7b", size_gb=13, ttft_slo_ms=7500, tpot_slo_ms=200)
LLAMA13 = ModelInfo("llama-2-13b", size_gb=25, ttft_slo_ms=12000, tpot_slo_ms=200)


def node(name: str, free: list[float], gbps: float, total: float | None = None,
         offered: float | None = None, cached: tuple[str, ...] = ()) -> NodeSnapshot:
    gpus = tuple(GPU(i, total or max(free), f) for i, f in enumerate(free))
    return NodeSnapshot(name, gpus, gbps, gbps if offered is None else offered,
                        frozenset(cached))


def v100s(n: int = 4) -> list[NodeSnapshot]:
    return [node(f"v100-{i}", [V100_GB] * 4, 16) for i in range(n)]


def a10s(n: int = 2) -> list[NodeSnapshot]:
    return [node(f"a10-{i}", [A10_GB] * 4, 64) for i in range(n)]


def request(model: ModelInfo, nodes: list[NodeSnapshot], **kw) -> PlacementRequest:
    return PlacementRequest(model=model, nodes=tuple(nodes), **kw)


# ---------------------------------------------------------------- worked examples (section 9)

def test_stage_sizes():
    assert stage_size_gb(13, 1) == 18 and stage_size_gb(13, 2) == 9
    assert stage_size_gb(25, 1) == 30 and stage_size_gb(25, 2) == 15
    assert stage_size_gb(25, 3) == 10 and stage_size_gb(25, 4) == 8


def test_llama7b_empty_testbed_gets_p1_on_fast_a10():
    # size(1) = ceil(13 + 5) = 18 <= 22: every node is master-capable.
    # p = 1, a = 1: B = best master-capable rnet = 64 (A10);
    # TTFT = 13 / 1 / 64 * 8 * 1000 + 0 + 0 + 2000 = 1625 + 2000 = 3625 < 7500 -> accept.
    # The V100s are listed first: bandwidth, not list order, decides.
    placement = place_ours(request(LLAMA7, v100s() + a10s()))
    assert placement is not None
    assert placement.p == 1 and not placement.consolidate
    assert placement.predicted_ttft_ms == pytest.approx(3625)
    (stage,) = placement.stages
    assert stage.node == "a10-0" and stage.all_card and stage.reserve_gb == 18


def test_llama7b_v100_only_gets_p2():
    # p = 1: B = 16 -> TTFT = 13 * 8000 / 16 + 2000 = 6500 + 2000 = 8500 >= 7500 -> reject.
    # p = 2 (4 nodes fit size(2) = 9), R = 1 so a runs 1..2; a = 1: rate = 1 + 1/2 = 1.5,
    # B = min(1st master rnet 16, 2nd rnet fitting size(2) 16) = 16,
    # TTFT = 13 / 2 / 16 * 8000 + 0 * 1.5 + 0 + 2000 = 3250 + 2000 = 5250 < 7500 -> accept.
    placement = place_ours(request(LLAMA7, v100s()))
    assert placement is not None
    assert placement.p == 2 and placement.consolidate
    assert placement.predicted_ttft_ms == pytest.approx(5250)
    master, part = placement.stages
    assert (master.rank, master.all_card, master.reserve_gb) == (0, True, 18)
    assert (part.rank, part.all_card, part.reserve_gb) == (1, False, 9)
    assert master.node != part.node


def test_llama13b_gets_v100_master_and_a10_part_card():
    # size(1) = 30 > 22: only the V100s are master-capable; size(2) = 15 <= 22: A10s fit p = 2.
    # p = 1: B = 16 -> TTFT = 25 * 8000 / 16 + 2000 = 12500 + 2000 = 14500 >= 12000 -> reject.
    # p = 2, a = 1: rate 1.5; B = min(1st master rnet 16, 2nd rnet fitting size(2) = 64) = 16;
    # TTFT = 25 / 2 / 16 * 8000 + 2000 = 6250 + 2000 = 8250 < 12000 -> accept.
    # Slot 0 (all-card) takes the best master-capable node (a V100, 30 GB), slot 1 (part-card)
    # the best remaining node fitting 15 GB (an A10 at 64 Gbps).
    placement = place_ours(request(LLAMA13, v100s() + a10s()))
    assert placement is not None
    assert placement.p == 2 and placement.consolidate
    assert placement.predicted_ttft_ms == pytest.approx(8250)
    master, part = placement.stages
    assert master.node.startswith("v100") and master.rank == 0
    assert master.all_card and master.reserve_gb == 30
    assert part.node.startswith("a10") and part.rank == 1
    assert not part.all_card and part.reserve_gb == 15


# ---------------------------------------------------------------- `ours`: the other rules

def test_profiled_tpot_over_slo_forces_p1_on_best_bandwidth():
    slow = ModelInfo("m", 13, 7500, tpot_slo_ms=84, profiled_tpot_ms=90)
    nodes = v100s(2) + [node("fast", [V100_GB], 24)]
    placement = place_ours(request(slow, nodes))
    assert placement is not None and placement.p == 1
    assert placement.stages[0].node == "fast" and placement.predicted_ttft_ms is None


def test_tpot_check_picks_more_all_card_workers():
    # tpot 60, SLO 84: (p=2, a=1) predicts 60 * 1.5 + 1 = 91 > 84; (p=2, a=2) 60 * 1 + 1 = 61.
    model = ModelInfo("m", 13, 7500, tpot_slo_ms=84, profiled_tpot_ms=60)
    placement = place_ours(request(model, v100s()))
    assert placement is not None and placement.p == 2
    assert all(s.all_card and s.reserve_gb == 18 for s in placement.stages)
    assert not placement.consolidate  # a == p


def test_no_master_capable_node_returns_none():
    assert place_ours(request(LLAMA13, a10s())) is None  # 30 GB never fits 22 GB
    silent = [node(f"v{i}", [V100_GB] * 4, 16, offered=0) for i in range(4)]
    assert place_ours(request(LLAMA13, silent + a10s())) is None  # masters offer no bandwidth


def test_nodes_offering_no_bandwidth_are_skipped():
    busy = [node(f"a10-{i}", [A10_GB] * 4, 64, offered=0) for i in range(2)]
    placement = place_ours(request(LLAMA7, busy + v100s()))
    assert placement is not None and placement.p == 2
    assert all(s.node.startswith("v100") for s in placement.stages)


def test_bottleneck_is_the_pth_best_fitting_node():
    # One master (30 GB fits only it) at 20 Gbps, three 22 GB nodes at 8 Gbps; SLO 12000.
    # p = 1: 25 * 8000 / 20 + 2000 = 12000, not < 12000. p = 2, a = 1: B = min(20, 8) = 8 ->
    # 25 / 2 / 8 * 8000 + 2000 = 14500; a = 2 exceeds the one master. p = 3, a = 1: B = 8 ->
    # 25 / 3 / 8 * 8000 + 2000 = 10333.3 < 12000 -> accept.
    nodes = [node(f"slow-{i}", [A10_GB] * 4, 8) for i in range(3)]
    nodes.append(node("master", [V100_GB], 20))
    placement = place_ours(request(LLAMA13, nodes))
    assert placement is not None and placement.p == 3
    assert placement.predicted_ttft_ms == pytest.approx(25 / 3 / 8 * 8000 + 2000)
    assert [(s.node, s.reserve_gb, s.all_card) for s in placement.stages] == [
        ("master", 30, True), ("slow-0", 10, False), ("slow-1", 10, False)]


def test_waiting_time_pushes_to_larger_p():
    # W = 3000: p = 2 gives 5250 + 3000 = 8250 >= 7500 for a = 1 and a = 2;
    # p = 3, a = 1: 13 / 3 / 16 * 8000 + 2000 + 3000 = 7166.7 < 7500.
    placement = place_ours(request(LLAMA7, v100s(), wait_ms=3000))
    assert placement is not None and placement.p == 3
    assert [s.all_card for s in placement.stages] == [True, False, False]
    assert placement.predicted_ttft_ms == pytest.approx(13 / 3 / 16 * 8000 + 5000)
    assert len({s.node for s in placement.stages}) == 3


def test_search_continues_until_p_reaches_instances_wanted():
    # R = 2: p = 1 meets the SLO (3625) but p < R, so p = 2 with a = 2 (both all-card):
    # B = min(2nd master rnet 64, 2nd fitting rnet 64) -> 13 / 2 / 64 * 8000 + 2000 = 2812.5.
    placement = place_ours(request(LLAMA7, v100s() + a10s(), instances_wanted=2))
    assert placement is not None and placement.p == 2
    assert {s.node for s in placement.stages} == {"a10-0", "a10-1"}
    assert all(s.all_card for s in placement.stages)
    assert placement.predicted_ttft_ms == pytest.approx(2812.5)


def test_fallback_when_no_choice_meets_the_slo():
    # SLO 3000: even p = 4 gives 13 / 4 / 16 * 8000 + 2000 = 3625.
    tight = ModelInfo("m", 13, 3000)
    nodes = v100s(3) + [node("v100-fast", [V100_GB] * 4, 16.5)]
    placement = place_ours(request(tight, nodes))
    assert placement is not None and placement.p == 1
    assert placement.stages[0].node == "v100-fast" and placement.predicted_ttft_ms is None


def test_single_worker_mode_with_max_p_1():
    placement = place_ours(request(LLAMA7, v100s(), max_p=1))
    assert placement is not None and placement.p == 1  # falls back: 8500 >= 7500


def test_prefill_counts_with_the_tpot_rate():
    assert tpot_rate(2, 1) == 1.5 and tpot_rate(4, 4) == 1 and tpot_rate(1, 1) == 1
    assert predict_ttft_ms(13, 2, 16, 100, 1.5, 500) == pytest.approx(3250 + 150 + 500 + 2000)


def test_gpu_best_fit_inside_a_node():
    mixed = node("m", [30, 19, 25], 64, total=V100_GB)
    placement = place_ours(request(LLAMA7, [mixed]))
    assert placement is not None and placement.stages[0].gpu == 1  # 19 is the tightest >= 18


# ---------------------------------------------------------------- baselines

def test_naive_ignores_network_and_takes_first_fitting_node():
    nodes = [node("full", [10] * 4, 64), node("quiet", [V100_GB], 16, offered=0)] + a10s()
    placement = place_naive(request(LLAMA7, nodes))
    assert placement is not None and placement.p == 1
    assert placement.stages[0].node == "quiet" and placement.stages[0].reserve_gb == 18
    assert place_naive(request(LLAMA13, a10s())) is None


def test_static_forces_p1_for_small_models():
    opt27 = ModelInfo("opt-2.7b", 7, 7500)
    placement = place_static(request(opt27, v100s() + a10s()), 4)
    assert placement is not None and placement.p == 1
    assert placement.stages[0].node == "a10-0"


def test_static_uses_p_best_bandwidth_nodes():
    placement = place_static(request(LLAMA13, v100s() + a10s()), 4)
    assert placement is not None and placement.p == 4 and not placement.consolidate
    assert [s.node for s in placement.stages] == ["a10-0", "a10-1", "v100-0", "v100-1"]
    assert all(s.reserve_gb == 8 and not s.all_card for s in placement.stages)
    assert place_static(request(LLAMA13, a10s()), 4) is None  # only 2 nodes


def test_cached_picks_a_node_holding_the_model():
    nodes = v100s(2) + [node("holder-small", [20] * 4, 16, total=V100_GB, cached=("m",)),
                        node("holder", [V100_GB, 25], 16, cached=("m",))] + a10s()
    model = ModelInfo("m", 13, 7500)
    placement = place_cached(request(model, nodes))
    assert placement is not None and placement.from_cache and placement.p == 1
    assert placement.stages[0].node == "holder" and placement.stages[0].gpu == 1
    assert place_cached(request(LLAMA7, nodes)) is None
    too_full = [node("h", [10] * 4, 16, total=V100_GB, cached=("m",))]
    assert place_cached(request(model, too_full)) is None


def test_registry_covers_every_policy():
    assert set(POLICIES) == set(PolicyName)
    assert PolicyName("ours") is PolicyName.OURS
    placement = POLICIES[PolicyName.STATIC](request(LLAMA13, v100s() + a10s(), max_p=2))
    assert placement is not None and placement.p == 2 and placement.policy == "static"


# ---------------------------------------------------------------- GPU ledger

def test_gpu_best_fit_and_leftover_absorption():
    ledger = GpuLedger({"n": [32, 32]})
    first = ledger.claim("n", None, 10)
    assert (first.gpu, first.gb) == (0, 10)  # tie -> lowest index; 22 left > 6
    second = ledger.claim("n", None, 20)  # GPU 0 (22 free) fits tighter than GPU 1 (32)
    assert (second.gpu, second.gb) == (0, 22)  # 2 GB left <= 6 -> absorbed
    assert [g.free_gb for g in ledger.snapshot_gpus("n")] == [0, 32]
    third = ledger.claim("n", 1, 26)  # leaves exactly 6 -> absorbed
    assert third.gb == 32
    with pytest.raises(ValueError, match="no GPU"):
        ledger.claim("n", None, 1)
    ledger.release(second)
    assert ledger.snapshot_gpus("n")[0].free_gb == 22
    with pytest.raises(ValueError, match="already released"):
        ledger.release(second)
    with pytest.raises(ValueError, match="unknown node"):
        ledger.claim("x", None, 1)


def test_gpu_exclusive_mode():
    ledger = GpuLedger({"n": [32, 32]}, share=False)
    held = ledger.claim("n", None, 10)
    assert [g.free_gb for g in ledger.snapshot_gpus("n")] == [0, 32]
    other = ledger.claim("n", None, 10)
    assert other.gpu == 1
    with pytest.raises(ValueError):
        ledger.claim("n", None, 1)
    ledger.release(held)
    assert ledger.snapshot_gpus("n")[0].free_gb == 32


# ---------------------------------------------------------------- NIC ledger

def test_claim_gbits_and_deadline():
    assert claim_gbits(13, 1) == 104
    assert claim_gbits(13, 2) == pytest.approx(13 * 8 / 2 / 0.9)
    req = PlacementRequest(LLAMA13, (), wait_ms=1000, after_fetch_ms=2000)
    assert fetch_deadline(100.0, req) == pytest.approx(100 + LLAMA13.ttft_slo_ms / 1000 - 3)
    later = dataclasses.replace(req, after_fetch_ms=4000)  # the cluster's constant, not 2000
    assert fetch_deadline(100.0, later) == pytest.approx(fetch_deadline(100.0, req) - 2)


def test_admission_refuses_when_an_ongoing_fetch_would_miss_its_deadline():
    nic = NicLedger({"n": 16})
    assert nic.offered("n", 0.0) == 16
    nic.book("n", 64, deadline=6.0, now=0.0)  # alone: 4 s; at a half share: 8 s > 6 s
    assert nic.offered("n", 0.0) == 0
    relaxed = NicLedger({"n": 16})
    relaxed.book("n", 64, deadline=8.0, now=0.0)  # at a half share exactly 8 s: still met
    assert relaxed.offered("n", 0.0) == 8
    free = NicLedger({"n": 16})
    free.book("n", 1000, deadline=None, now=0.0)  # no deadline never blocks
    assert free.offered("n", 0.0) == 8


def test_equal_sharing_and_completion():
    nic = NicLedger({"n": 16, "m": 10})
    big = nic.book("n", 64, None, 0.0)
    small = nic.book("n", 32, None, 0.0)
    assert nic.advance(2.0) == []
    assert (big.remaining_gb, small.remaining_gb) == (48, 16)  # 8 Gbps each
    # small completes at t = 4; from then on big has all 16 Gbps: 32 - 16 = 16 left at t = 5
    assert nic.advance(5.0) == [small]
    assert big.remaining_gb == pytest.approx(16)
    assert nic.advance(6.0) == [big] and nic.idle(["n", "m"], 6.0)


def test_finish_and_idle():
    nic = NicLedger({"a": 16, "b": 16})
    fetch = nic.book("a", 100, None, 0.0)
    assert not nic.idle(["a", "b"], 1.0) and nic.idle(["b"], 1.0)
    nic.finish(fetch)
    assert nic.idle(["a", "b"], 1.0) and nic.advance(2.0) == []
    with pytest.raises(ValueError):
        nic.finish(fetch)


def test_exclusive_booking():
    nic = NicLedger({"n": 16})
    other = nic.book("n", 16, None, 0.0)
    assert nic.exclusive("n", 32, 0.0) is None  # busy: consolidation must wait
    assert nic.advance(1.0) == [other]
    held = nic.exclusive("n", 32, 1.0)
    assert held is not None and held.exclusive
    assert nic.offered("n", 1.5) == 0
    assert nic.advance(3.0) == [held]  # 32 Gb at the full 16 Gbps
    assert nic.offered("n", 3.0) == 16
    forever = nic.exclusive("n", math.inf, 3.0)
    assert forever is not None and nic.advance(100.0) == [] and nic.offered("n", 100.0) == 0
    nic.finish(forever)
    assert nic.offered("n", 100.0) == 16


def test_ledgers_feed_a_second_placement():
    gpus = GpuLedger({n.name: [g.total_gb for g in n.gpus] for n in v100s() + a10s()})
    nic = NicLedger({n.name: n.nic_gbps for n in v100s() + a10s()})

    def snapshot(now: float) -> list[NodeSnapshot]:
        return [NodeSnapshot(name, gpus.snapshot_gpus(name), nic.bandwidth(name),
                             nic.offered(name, now)) for name in gpus.nodes]

    req = request(LLAMA13, snapshot(0.0))
    placement = place_ours(req)
    assert placement is not None and placement.p == 2
    deadline = fetch_deadline(0.0, req)  # 10 s
    for stage in placement.stages:
        gpus.claim(stage.node, stage.gpu, stage.reserve_gb)
        nic.book(stage.node, claim_gbits(LLAMA13.size_gb, placement.p), deadline, 0.0)
    # The A10 now fetches 111.1 Gb within 10 s: at a half share (32 Gbps) it still makes it.
    after = {n.name: n for n in snapshot(0.0)}
    part = placement.stages[1].node
    assert after[part].offered_gbps == 32
    master = placement.stages[0].node  # 111.1 Gb in 10 s needs 11.1 Gbps > 8: refused
    assert after[master].offered_gbps == 0
