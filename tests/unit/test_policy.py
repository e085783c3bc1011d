"""The speed policy against the step simulator: known costs, known acceptance, noise, drift and load changes.

Every phase's throughput is compared with each fixed plan run through the same phases (same seed), the best of
which is chosen in hindsight per phase: the policy has to find it online, without knowing the costs or the
acceptance. Deterministic; no vLLM.
"""

import numpy as np
import pytest

from vllm_dspark.policy import DraftPause, LinearCost, SpeedPolicy, StepCost, StepReport
from vllm_dspark.policy.simulator import CPU_SMOLLM2, GPU_FLAT, EngineModel, FixedPolicy, Phase, simulate

K = 7
SHIPPED = [.31, .25, .25, .2, .2, .2, .2]  # the shipped SmolLM2 drafter's conditional acceptance, roughly
GOOD = [.75, .7, .65, .6, .6, .55, .5]  # a published-grade drafter
BAD = [.02] * K  # text the drafter cannot guess


def compare(engine, phases, seed=0, noise=0.05):
    """Per phase: (policy's tokens/s over the best fixed plan's, over no speculation's, best fixed length)."""
    fixed = {n: simulate(FixedPolicy(n), engine, phases, K, seed=seed, noise=noise) for n in range(K + 1)}
    mine = simulate(SpeedPolicy(K), engine, phases, K, seed=seed, noise=noise)
    out = []
    for i in range(len(phases)):
        thr = {n: fixed[n][i].throughput for n in fixed}
        best = max(thr, key=thr.get)
        out.append((mine[i].throughput / thr[best], mine[i].throughput / thr[0], best))
    return out, mine


CASES = {
    # this CPU: drafting pays only for one request; load comes and goes
    "cpu-shipped": (CPU_SMOLLM2, [Phase(1500, 1, SHIPPED), Phase(800, 16, SHIPPED), Phase(1500, 1, SHIPPED),
                                  Phase(800, 4, SHIPPED), Phase(800, 32, SHIPPED)]),
    # a strong drafter on this CPU: long blocks alone, short ones at 4 requests, none at 16
    "cpu-good": (CPU_SMOLLM2, [Phase(1500, 1, GOOD), Phase(1000, 4, GOOD), Phase(800, 16, GOOD)]),
    # a GPU-like engine: verification nearly free until the batch is large
    "gpu-good": (GPU_FLAT, [Phase(1500, 1, GOOD), Phase(800, 16, GOOD), Phase(500, 256, GOOD)]),
    "gpu-shipped": (GPU_FLAT, [Phase(1500, 1, SHIPPED), Phase(800, 16, SHIPPED), Phase(500, 256, SHIPPED)]),
    # acceptance changes under the policy: text the drafter cannot guess, then drift from good to shipped
    "drift": (CPU_SMOLLM2, [Phase(1500, 1, SHIPPED), Phase(1500, 1, BAD), Phase(1500, 2, GOOD, drift_to=SHIPPED)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_within_3_percent_of_the_best_fixed_plan_in_every_phase(case):
    engine, phases = CASES[case]
    ratios, _ = compare(engine, phases)
    for i, (vs_best, vs_plain, best) in enumerate(ratios):
        assert vs_best >= 0.97, f"{case} phase {i} ({phases[i].batch} requests): {vs_best:.3f} of fixed K={best}"
        # never below not speculating by more than what the probes and the measurement of plain steps cost
        assert vs_plain >= 0.98, f"{case} phase {i}: {vs_plain:.3f} of no speculation"


def test_the_best_fixed_plan_differs_between_phases():
    """The cases above are not passed by one fixed plan: the best length moves with load and engine."""
    bests = {case: [b for _, _, b in compare(*CASES[case])[0]] for case in ("cpu-shipped", "cpu-good", "gpu-good")}
    assert bests["cpu-shipped"][0] >= 1 and bests["cpu-shipped"][1] == 0  # one request drafts, 16 do not
    assert bests["cpu-good"][0] >= bests["cpu-good"][1] > bests["cpu-good"][2] == 0
    assert bests["gpu-good"][1] >= 5 and bests["gpu-good"][2] == 0


@pytest.mark.parametrize("seed,noise", [(1, 0.15), (2, 0.15)])
def test_noisier_timings_still_track_the_best_plan(seed, noise):
    engine, phases = CASES["cpu-shipped"]
    ratios, _ = compare(engine, phases, seed=seed, noise=noise)
    assert min(r for r, _, _ in ratios) >= 0.96, ratios


def test_reacts_to_load_within_a_few_steps():
    phases = [Phase(600, 1, SHIPPED), Phase(400, 32, SHIPPED), Phase(400, 1, SHIPPED)]
    mine = simulate(SpeedPolicy(K), CPU_SMOLLM2, phases, K)
    busy, idle = mine[1].drafted, mine[2].drafted
    assert sum(busy[:2]) <= 1  # load rose: at most the step the verdict needs
    assert sum(busy) <= 8  # then only probes, ever rarer
    assert idle.index(1) <= 1  # load fell to half or less: the pause ends at once
    assert sum(idle[100:]) >= 0.95 * len(idle[100:])


def test_an_overconfident_head_is_trusted_only_as_far_as_verification_bears_it_out():
    """Confidences 3 logits too high at every position: what was accepted of the drafts corrects them."""
    phases = [Phase(800, 1, SHIPPED), Phase(800, 4, SHIPPED)]
    fixed = [simulate(FixedPolicy(n), CPU_SMOLLM2, phases, K) for n in (0, 2)]
    mine = simulate(SpeedPolicy(K), CPU_SMOLLM2, phases, K, confidence_bias=3.0)
    assert mine[1].throughput >= 0.97 * fixed[0][1].throughput  # 4 requests: drafting does not pay, found
    assert mine[0].throughput >= 0.97 * fixed[1][0].throughput  # 1 request: it still pays


def test_an_idle_engine_between_steps_is_not_a_step_cost():
    cost = StepCost()
    for _ in range(20):
        cost.observe(StepReport(period=0.041, forward=0.035, tokens=4, batch=1, verified=True, drafter=0.005,
                                drafted=1))
    before = cost.seconds(4, 1, 1)
    cost.observe(StepReport(period=5.0, forward=0.035, tokens=4, batch=1, verified=True, drafter=0.005, drafted=1))
    assert cost.seconds(4, 1, 1) == pytest.approx(before)
    assert before == pytest.approx(0.041, rel=0.02)  # forward + drafter + the rest, each from its own timing


def test_step_cost_parts_add_up_to_what_was_measured():
    engine = EngineModel({1: 0.03, 64: 0.1}, drafter=(0.004, 0.001), rest_plain=(0.001, 0.0), rest_spec=(0.003, 0.0005))
    cost = StepCost()
    rng = np.random.default_rng(0)
    for _ in range(400):
        b = int(rng.integers(1, 9))
        spec = bool(rng.integers(0, 2))
        tokens = b * (1 + int(rng.integers(0, 4))) if spec else b
        fwd, dr = engine.forward(tokens), (engine.drafter[0] + engine.drafter[1] * b) if spec else 0.0
        rest = sum(x * y for x, y in zip(engine.rest_spec if spec else engine.rest_plain, (1, b)))
        cost.observe(StepReport(period=fwd + dr + rest, forward=fwd, tokens=tokens, batch=b, verified=spec,
                                drafter=dr, drafted=b if spec else 0))
    # an independent sum of the engine's parts, at sizes the fit saw and one it extrapolates to
    # (12, 4, 0): drafts that cost the drafter nothing (copied) still make a speculative step
    for tokens, b, drafted in [(8, 2, 2), (3, 3, 0), (40, 8, 8), (12, 4, 0)]:
        rest = engine.rest_spec if drafted or tokens > b else engine.rest_plain
        truth = engine.forward(tokens) + (engine.drafter[0] + engine.drafter[1] * drafted if drafted else 0.0) \
            + rest[0] + rest[1] * b
        assert cost.seconds(tokens, b, drafted) == pytest.approx(truth, rel=0.02)


def test_verification_is_priced_from_verify_steps_alone():
    """Prefill steps run more tokens per millisecond than decode steps (SmolLM2 on this CPU: ~0.7-1.0 ms per
    prompt token, ~1.3 ms per decode token), and a step that verifies drafts pays a fixed extra on top of its
    tokens (several query tokens per request take another attention path): neither may price the other."""
    cost = StepCost()
    rng = np.random.default_rng(3)
    plain = lambda tokens: 0.010 + 0.0015 * tokens  # noqa: E731 - the engine's forward, by hand
    verify = lambda tokens: plain(tokens) + 0.008  # noqa: E731
    for i in range(400):
        if i % 8 == 0:  # a prompt chunk joining the batch: cheap per token
            tokens = int(rng.integers(100, 2000))
            cost.observe(StepReport(period=0.0007 * tokens + 0.002, forward=0.0007 * tokens, tokens=tokens,
                                    batch=16, prefill=True))
            continue
        b = int(rng.integers(8, 17))
        tokens = b + int(rng.integers(0, 2)) * int(rng.integers(4, 40))  # plain, or verifying drafts
        fwd = verify(tokens) if tokens > b else plain(tokens)
        cost.observe(StepReport(period=fwd + 0.002, forward=fwd, tokens=tokens, batch=b, verified=tokens > b))
    assert cost.seconds(16, 16, 0) == pytest.approx(plain(16) + 0.002, rel=0.03)
    for tokens in (30, 50, 120):
        assert cost.seconds(tokens, 16, 0) == pytest.approx(verify(tokens) + 0.002, rel=0.03)


def test_lengths_price_the_whole_batch_not_only_the_rows_with_drafts():
    """Two requests of 32 have copied drafts that would pay in a step of their own, not in a step of 32: the
    plan must see the 30 others' tokens (they were left out, and copies were verified at a loss under load)."""
    policy = SpeedPolicy(k=7)
    plain = lambda tokens: 0.020 + 0.0011 * tokens  # noqa: E731 - the engine's forward, by hand
    for b in (2, 4, 8, 16, 32):
        for extra in (0, 3, 5, 9):
            fwd = plain(b + extra) + (0.010 if extra else 0.0)  # verifying pays a fixed extra
            for _ in range(4):
                policy.cost.observe(StepReport(period=fwd + 0.001, forward=fwd, tokens=b + extra, batch=b,
                                               verified=extra > 0))
    copies = np.full((2, 7), 0.9).cumprod(1)
    by_hand = lambda b, n: (b + copies[:, :n].sum()) / policy.cost.seconds(b + 2 * n, b)  # noqa: E731 - tok/s
    assert by_hand(2, 3) > by_hand(2, 0) and max(by_hand(32, n) for n in range(1, 8)) < by_hand(32, 0)
    assert policy.lengths(copies, [7, 7], batch=2, drafted=0) != [0, 0]
    assert policy.lengths(copies, [7, 7], batch=32, drafted=0) == [0, 0]


def test_linear_cost_slope_stays_between_flat_and_proportional():
    flat = LinearCost()
    rng = np.random.default_rng(1)
    for _ in range(200):
        b = int(rng.integers(1, 30))
        flat.observe(b, 0.012 * float(np.exp(0.2 * rng.standard_normal())))  # noise can make the slope negative
    a, b = flat.coefficients()
    assert b >= 0 and a > 0
    steep = LinearCost()
    for x in range(40, 200, 7):
        steep.observe(x, 0.001 * x)
    a, b = steep.coefficients()
    assert a >= 0 and b <= 0.001 * (1 + 1e-9)


def test_lengths_follow_confidence_and_cost():
    def taught(seconds):
        policy = SpeedPolicy(4)
        for tokens in list(range(1, 13)) * 5:
            policy.cost.observe(StepReport(period=seconds(tokens) + 0.001, forward=seconds(tokens), tokens=tokens,
                                           batch=1))
        return policy

    sure, unsure = [0.99, 0.98, 0.97, 0.96], [0.05, 0.01, 0.0, 0.0]
    flat = taught(lambda b: 0.010)  # verifying 5 tokens costs what 1 costs: every draft that may be accepted
    assert flat.lengths(np.array([sure, unsure]), [4, 4], batch=2) == [4, 2]
    assert flat.lengths(np.array([sure]), [2], batch=1) == [2]  # capped
    steep = taught(lambda b: 0.010 + 0.004 * b)  # each token 40% of a step: only the sure drafts pay
    assert steep.lengths(np.array([sure, unsure]), [4, 4], batch=2) == [4, 0]


def test_draft_pause_backs_off_exponentially_and_resets():
    pause = DraftPause(base=4, cap=16)
    assert not pause.active(0, 32)
    starts, step = [], 0
    for _ in range(5):  # five verdicts against drafting in a row, each right when the pause ends
        pause.not_worth_it(step, 32)
        paused = [s for s in range(step, step + 40) if pause.active(s, 32)]
        assert paused == list(range(step, paused[-1] + 1))
        starts.append(len(paused))
        step = paused[-1] + 1
    assert starts == [4, 8, 16, 16, 16]  # doubled, capped
    pause.worth_it()
    pause.not_worth_it(step, 32)
    assert [pause.active(step + i, 32) for i in range(5)] == [True] * 4 + [False]  # back to the base pause
    for grow_to, lengths in [(8, [4, 8, 8]), (4, [4, 4, 4])]:  # a smaller cap (small batches; near break-even)
        pause.worth_it()
        got = []
        for _ in range(3):
            step += 20
            pause.not_worth_it(step, 2, grow_to)
            got.append(sum(pause.active(step + i, 2) for i in range(20)))
        assert got == lengths


def test_draft_pause_ends_when_the_batch_halves():
    pause = DraftPause(base=8, cap=64)
    pause.not_worth_it(0, 32)
    pause.not_worth_it(8, 32)  # the second pause: 16 steps
    assert pause.active(9, 17)  # still more than half the batch
    assert not pause.active(10, 16)  # load fell: probe at once ...
    pause.not_worth_it(10, 16)
    assert [pause.active(10 + i, 16) for i in range(9)] == [True] * 8 + [False]  # ... with a fresh backoff
    with pytest.raises(ValueError, match="expected 1 <= base <= cap; got base=8, cap=4"):
        DraftPause(8, 4)


def test_lookups_that_found_nothing_do_not_price_a_plain_step():
    """A step whose suffix lookups found nothing to verify is plain in its tokens but paid for the lookups: fitted
    in as plain, it priced not speculating above what a plain step costs, so copies looked better than they were."""
    cost = StepCost()
    fwd = lambda tokens: 0.010 + 0.0013 * tokens  # noqa: E731 - the engine's forward, by hand
    for i in range(200):
        looked = i % 4 != 0  # a quarter are plain steps without lookups (the policy's plain windows)
        rest = 0.001 + (0.004 if looked else 0.0)
        cost.observe(StepReport(period=fwd(32) + rest, forward=fwd(32), tokens=32, batch=32, looked=looked))
    assert cost.seconds(32, 32, 0) == pytest.approx(fwd(32) + 0.001, rel=0.01)


def test_plans_report_the_seconds_they_expect_to_save():
    """saved = the plan's expected tokens at a plain step's rate, less the same tokens at the plan's rate (worked
    out here from the cost line by hand); nothing planned saves nothing."""
    policy = SpeedPolicy(k=7)
    line = lambda tokens: 0.020 + 0.0011 * tokens  # noqa: E731 - every step's seconds, by hand
    for tokens in range(4, 40):
        for verified in (False, True):
            policy.cost.observe(StepReport(period=line(tokens), forward=line(tokens) - 0.001, tokens=tokens, batch=4,
                                           verified=verified))
    sure = np.full((2, 7), 0.95).cumprod(1)
    lengths = policy.lengths(sure, [7, 7], batch=4, drafted=0)
    assert sum(lengths) > 0
    tokens = 4 + sum(lengths)
    tau = 4 + sum(sure[r, :n].sum() for r, n in enumerate(lengths))
    by_hand = tau / (4 / policy.cost.seconds(4, 4, 0)) - policy.cost.seconds(tokens, 4, 0)
    assert policy.last_saved == pytest.approx(by_hand, rel=1e-6) and by_hand > 0
    assert policy.lengths(np.zeros((2, 7)), [7, 7], batch=4, drafted=0) == [0, 0] and policy.last_saved == 0.0


def test_copying_pauses_when_its_lookups_cost_more_than_its_plans_expect_to_save():
    policy = SpeedPolicy(k=7, pause_base=8, pause_cap=64)
    step = 0

    def run(saved, spent, steps, batch=32):
        nonlocal step
        paused = []
        for _ in range(steps):
            policy.begin(None, batch)
            step += 1
            paused.append(policy.copies_paused(batch))
            if not paused[-1]:
                policy.last_saved = saved
                policy.judge_copies(spent, batch)
        return paused

    assert not any(run(saved=0.0005, spent=0.001, steps=SpeedPolicy.COPY_WINDOW - 1))
    first = run(saved=0.0005, spent=0.001, steps=1 + 8 + SpeedPolicy.COPY_WINDOW)
    assert first[1:9] == [True] * 8 and not first[9]  # the verdict, then a pause of 8 steps
    second = run(saved=0.0005, spent=0.001, steps=16)
    assert second == [True] * 16  # the second verdict against: the pause doubled
    assert not run(saved=0.0, spent=0.001, steps=1, batch=16)[0]  # the batch halved: lookups at once
    assert not any(run(saved=0.003, spent=0.001, steps=3 * SpeedPolicy.COPY_WINDOW, batch=16))  # they pay


def test_copies_in_bursts_keep_lookups_on():
    """One request whose text repeats now and then: most windows find nothing, but what the bursts save outweighs
    the lookups by far (the verdict weighs a long horizon, not the last window)."""
    policy = SpeedPolicy(k=7)
    paused = 0
    for i in range(2000):
        policy.begin(None, 1)
        if policy.copies_paused(1):
            paused += 1
            continue
        policy.last_saved = 0.05 if i % 100 < 3 else 0.0  # a loop every 100 steps: 3 steps copy, saving 50 ms
        policy.judge_copies(0.0001, 1)
    assert paused == 0
