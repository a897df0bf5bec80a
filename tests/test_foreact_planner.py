"""ForeAct's control loop and the toy tabletop world: the scripted expert solves every task, the agent loop with an
oracle planner, oracle foresight and an expert policy succeeds, a prompted-VLM planner follows its model's answers,
and bad input raises."""

import numpy as np
import pytest

from jaxeff.foreact import tabletop as T
from jaxeff.foreact.planner import Agent, GeneratorForesight, ScriptedPlanner, VLMPlanner


def test_expert_solves_every_task():
    rng = np.random.default_rng(0)
    for task in range(len(T.TASKS)):
        env = T.Tabletop().reset(rng, task)
        assert not env.success()
        for sub in T.subtasks(task):
            before = env.render()
            env.step(*T.expert_action(env, sub))
            assert env.done(sub) and not np.array_equal(before, env.render())
        assert env.success()
        frame = env.render()
        assert frame.shape == (T.SIZE, T.SIZE, 3) and frame.min() >= -1 and frame.max() <= 1


def test_world_primitives_and_bad_input():
    env = T.Tabletop().reset(np.random.default_rng(0), 9)  # a stack task
    a, b, _ = T.TASKS[9][1]
    (cell_a, _), (cell_b, _) = env.where(a), env.where(b)
    env.step(cell_b, cell_a)  # b onto a: a is covered now
    assert env.where(b) == (cell_a, 1) and env.gripper == cell_a and cell_b not in env.stacks
    with pytest.raises(ValueError, match="covered"):
        T.expert_action(env, T.SUBTASKS[a])
    empty = next(c for c in range(T.CELLS) if c not in env.stacks)
    stacks = {k: list(v) for k, v in env.stacks.items()}
    env.step(empty, cell_b)  # picking an empty cell only moves the gripper
    assert env.stacks == stacks and env.gripper == cell_b
    with pytest.raises(ValueError, match="place cell"):
        env.step(0, T.CELLS)
    with pytest.raises(ValueError, match="subtask"):
        env.done("put the cup on the table")
    with pytest.raises(ValueError, match="vocabulary"):
        T.encode_words(["pick up the cup"])


def test_agent_with_oracle_foresight_and_expert_policy():
    rng = np.random.default_rng(1)
    envs = [T.Tabletop().reset(rng, task) for task in (0, 7, 11)]
    planner = ScriptedPlanner([T.subtasks(e.task_id) for e in envs], lambda i, s: envs[i].done(s))
    seen = []

    def oracle(frames, texts, ids):
        out = []
        for i, text in zip(ids, texts):
            env = envs[i].copy()
            env.step(*T.expert_action(env, text))
            out.append(env.render())
        seen.append(len(ids))
        return np.asarray(out)

    def policy(obs, texts, goals):  # the expert, reading the simulators; checks the foresight it is given
        assert goals is not None and goals.shape == obs.shape
        live = [i for i, e in enumerate(envs) if planner.plan(None, None)[i] is not None]
        return np.array([T.expert_action(envs[i], t) for i, t in zip(live, texts)])

    agent = Agent(planner, policy, oracle)
    for _ in range(4):
        actions, plans = agent.act(np.stack([e.render() for e in envs]), [""] * 3)
        assert actions.shape == (3, 2)
        if all(p is None for p in plans):
            break
        for env, a, p in zip(envs, actions, plans):
            if p is not None:
                env.step(*a)
    assert all(e.success() for e in envs) and (actions == -1).all()
    assert sum(seen) == 9  # one foresight per subtask, only when the subtask changes
    assert len(agent.plan_seconds) == len(seen)


def test_vlm_planner_follows_answers():
    answers = iter(["put the red block on the red pad", "no", "yes", "DONE"])
    asked = []

    def ask(image, prompt):
        asked.append(prompt)
        return next(answers)

    planner = VLMPlanner(ask)
    obs = np.zeros((1, 4, 4, 3))
    assert planner.plan(obs, ["sort"]) == ["put the red block on the red pad"]
    assert planner.plan(obs, ["sort"]) == ["put the red block on the red pad"]  # "no": not complete
    assert planner.plan(obs, ["sort"]) == [None]  # "yes", then DONE
    assert "Completed subtasks: put the red block on the red pad" in asked[-1]


def test_generator_foresight_bad_null_frame():
    # GeneratorForesight itself runs end to end in notebooks/foreact.ipynb (tests/test_notebooks.py) and in the
    # foreact_tabletop experiment; building a model here costs more than the check is worth
    with pytest.raises(ValueError, match="null_frame"):
        GeneratorForesight(None, None, None, None, null_frame="white")


def test_generator_foresight_bad_input_and_chunks(monkeypatch):
    """Integer frames (uint8 in [0, 255] would run as a finite, meaningless image), a bare str, a text count other
    than the frame count and malformed frames are refused by name before any model runs; a call with b frames runs
    chunks padded to min(chunk, the power of two >= b), so one foresight costs one frame of work."""
    fs = GeneratorForesight(None, None, None, None)
    frames = np.zeros((2, 8, 8, 3), np.float32)
    cases = [((frames.astype(np.uint8), ["a", "b"]), r"GeneratorForesight got uint8 values; it expects float images "
                                                      r"in \[-1, 1\]: convert with frames.astype"),
             ((frames, "pick up the cup"), r"got one str 'pick up the cup': pass \[text\]"),
             ((frames, ["pick up the cup"]), "one str text per frame, got 1 texts for 2 frames"),
             ((frames, ["a", 3]), "one str text per frame"),
             ((frames[0], ["a"] * 8), r"frames must be \[b, H, W, C\] with b >= 1, got \(8, 8, 3\)"),
             ((frames[:0], []), r"b >= 1")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            fs(*args)
    for chunk in (0, 2.0, True):
        with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
            GeneratorForesight(None, None, None, None, chunk=chunk)
    seen = []

    def fake_chunk(self, f, texts, n):  # records (frames, padded size); returns the frames
        seen.append((len(f), n))
        return f

    monkeypatch.setattr(GeneratorForesight, "_chunk", fake_chunk)
    for b, expected in ((1, [(1, 1)]), (3, [(3, 4)]), (8, [(8, 8)]), (11, [(8, 8), (3, 8)])):
        seen.clear()
        x = np.random.default_rng(b).normal(size=(b, 4, 4, 3)).astype(np.float32)
        np.testing.assert_array_equal(fs(x, ["t"] * b), x)
        assert seen == expected
