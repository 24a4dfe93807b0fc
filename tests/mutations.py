"""The mutations the suite must catch (issue #19): one small change to the code at a time, and the tests that fail.

    .venv/bin/python -m tests.mutations            # apply each mutation, run its tests, report caught / survived
    .venv/bin/python -m tests.mutations --list     # the table only
    .venv/bin/python -m tests.mutations --only facts   # the mutations whose description or file names 'facts'

Each entry names the line it breaks (the exact text, so an entry whose line moved or changed fails
`tests/test_mutations.py` in the fast tier and gets updated with the code), what the break means, and the tests
that catch it; all but the vLLM version tag and the mid-run reward stop are caught by the fast tier. The source file is restored after each
run, whatever happens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that fail once it is applied
    fast: bool = True  # caught by the fast tier (`make test-fast`)


MUTATIONS = [
    Mutation("the learner flips delta_V's sign (trains at V = mean + 0.1: the collapsing regime)", "asymre/advantages.py",
             "delta_v_at(step, lc.delta_v, lc.delta_v_final, lc.delta_v_steps)", "-delta_v_at(step, lc.delta_v, lc.delta_v_final, lc.delta_v_steps)",
             ("tests/test_learner.py::test_step_baselines_written_out_by_hand", "tests/test_advantages.py")),
    Mutation("the learner puts every sample of a step in one group", "asymre/learner.py", "                gids.append(gi)",
             "                gids.append(0)", ("tests/test_learner.py::test_step_baselines_written_out_by_hand",)),
    Mutation("train_step passes no normaliser (each micro-batch averages itself)", "asymre/learner.py",
             'loss, m = self._micro_loss(batch, idx, normalizer, "reinforce" if supervised else lc.name)',
             'loss, m = self._micro_loss(batch, idx, None, "reinforce" if supervised else lc.name)',
             ("tests/test_learner.py::test_train_step_gradient_is_the_whole_batch_loss_gradient",
              "tests/test_learner.py::test_micro_batching_equals_full_batch_gradient")),
    Mutation("a checkpoint saves the learner's weights instead of the lagging engine's behaviour weights", "recipes/train.py",
             "behaviour = self.rollout.behaviour(step)", "behaviour = self.learner.full_state_dict()",
             ("tests/test_offpolicy_checkpoint.py",)),
    Mutation("resume gives the engine the learner's weights instead of the saved behaviour weights", "asymre/rollout/modes.py",
             "            self.sync.push(behaviour, version, [self.engine])\n            self.last_pushed = behaviour if",
             "            self.sync.push(self.weights(), version, [self.engine])\n            self.last_pushed = behaviour if",
             ("tests/test_offpolicy_checkpoint.py",)),
    Mutation("a reward that returns the wrong length or type is trusted (samples dropped, the run goes on)", "asymre/rewards/__init__.py",
             "            if outcome.contract:", "            if outcome.contract and False:",
             ("tests/rewards/test_rewards.py::test_a_reward_of_the_wrong_length_stops_the_run_naming_it_and_the_lengths",
              "tests/test_bad_input.py::test_a_reward_of_the_wrong_shape_stops_at_start_up_naming_it")),
    Mutation("the preflight passes a reward that pays references no more than an empty completion", "asymre/rewards/preflight.py",
             "t.reward > min(totals)", "t.reward >= min(totals)",
             ("tests/test_bad_input.py::test_a_reward_reading_a_column_the_task_does_not_have_stops_at_start_up",)),
    Mutation("a sharded push stops reading the stream where the engine stopped (the ranks' all-gathers part ways)", "asymre/rollout/modes.py",
             "            for _ in stream:  # the rest", "            for _ in []:  # the rest",
             ("tests/rollout/test_modes.py::test_a_sharded_learners_push_streams_one_tensor_at_a_time_and_every_rank_reads_it_all",)),
    Mutation("a reward error mid-run stops without checkpointing the last step", "recipes/train.py",
             "        try:\n            self._save_checkpoint()\n        except CheckpointError as ce:",
             "        try:\n            pass\n        except CheckpointError as ce:",
             ("tests/test_bad_input.py::test_a_reward_that_breaks_the_contract_mid_run_stops_in_one_line_and_the_run_resumes_once_fixed",),
             fast=False),
    Mutation("the generation loop (every backend's generate) tags every group with version 0", "asymre/rollout/episodes.py",
             "trajectories=trajs, version=version)", "trajectories=trajs, version=0)",
             ("tests/rollout/test_episodes.py::test_an_episode_is_the_models_tokens_plus_the_templates_rendering_of_each_tool_message",
              "tests/rollout/test_vllm_engine.py::test_vllm_generate_buffer_learn_push")),
    Mutation("rewards of +/-inf are kept", "asymre/rewards/__init__.py", "bad = math.isnan(f) or math.isinf(f)", "bad = math.isnan(f)",
             ("tests/rewards/test_rewards.py::test_infinite_rewards_are_dropped_and_counted",)),
    Mutation("WeightSync.due is off by one", "asymre/sync.py", "return learner_step > 0 and learner_step % self.interval == 0",
             "return learner_step > 0 and (learner_step + 1) % self.interval == 0",
             ("tests/test_learner.py::test_weight_push_is_due_every_interval_steps", "tests/test_offpolicy_checkpoint.py")),
    Mutation("collected groups are tagged with the learner's step instead of the engine's version", "asymre/rollout/modes.py",
             "                metrics.update(self.scorer.score(groups, learner_step))\n                self.buffer.add(groups)\n        except",
             "                metrics.update(self.scorer.score(groups, learner_step))\n"
             "                [setattr(g, 'version', learner_step) for g in groups]\n                self.buffer.add(groups)\n        except",
             ("tests/test_offpolicy_checkpoint.py",)),
    Mutation("shared prompts: the completions' gradient does not flow back into the prompt (its KV cache detached)",
             "asymre/forward.py", "        cache.reorder_cache(sel)  # [n, ...] -> [b, ...]\n",
             "        cache.reorder_cache(sel)  # [n, ...] -> [b, ...]\n"
             "        for layer in cache.layers:\n            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()\n",
             ("tests/test_learner.py::test_shared_prompt_gradient_equals_one_row_per_sample",)),
    Mutation("episodes: the shared-prompt path trains the environment's inserted tokens (mask ignored)", "asymre/forward.py",
             "        mask[row, :c] = batch.trained(i)", "        mask[row, :c] = 1",
             ("tests/test_learner.py::test_multi_turn_episode_gradient_trains_the_models_tokens_only",)),
    Mutation("episodes: the row-per-sample path trains the environment's inserted tokens (mask ignored)", "asymre/forward.py",
             "        mask[row, keep - c:] = batch.trained(i)", "        mask[row, keep - c:] = 1",
             ("tests/test_learner.py::test_multi_turn_episode_gradient_trains_the_models_tokens_only",)),
    Mutation("episodes: token_mean divides by every completion token, the environment's included", "asymre/forward.py",
             "        return sum(c if m is None else sum(m) for c, m in zip(self.completion_lens, self.masks))",
             "        return sum(self.completion_lens)",
             ("tests/test_learner.py::test_multi_turn_episode_gradient_trains_the_models_tokens_only",)),
    Mutation("the facts split trains on the held-out people too", "asymre/tasks/facts.py",
             "    return order[n_held:], order[:n_held]", "    return order, order[:n_held]",
             ("tests/tasks/test_facts.py::test_held_out_people_are_never_named_by_a_training_prompt",)),
    Mutation("the facts reward matches a value inside a longer word", "asymre/tasks/facts.py",
             'out.append(float(f" {normalise(str(a))} " in f" {normalise(_final_text(c))} "))',
             'out.append(float(normalise(str(a)) in normalise(_final_text(c))))',
             ("tests/tasks/test_facts.py::test_the_reward_normalises_and_matches_whole_values_in_the_final_answer",)),
    Mutation("a demonstration trains the tool's result too", "asymre/warm_start.py",
             "            seg, flag = full[len(ids):], 0", "            seg, flag = full[len(ids):], 1",
             ("tests/tasks/test_facts.py::test_demonstrations_are_the_episodes_the_loop_records_token_for_token",)),
    Mutation("the warm-start's supervised step weighs demonstrations by their reward, not advantage 1", "asymre/learner.py",
             "return StepBatch(seqs, comp_lens, r, torch.ones_like(r),", "return StepBatch(seqs, comp_lens, r, r,",
             ("tests/test_learner.py::test_a_supervised_step_is_the_negative_log_likelihood_of_the_models_tokens",)),
    Mutation("the learner steps AdamW on bf16 parameters (updates at the paper's lr vanish)", "asymre/learner.py",
             'model = load_model(model_path, "float32")', "model = load_model(model_path, cfg.model.dtype)",
             ("tests/test_learner.py::test_bf16_learner_keeps_float32_master_weights_and_learns_at_the_papers_lr",)),
    Mutation("async: an evaluation between pushes leaves the workers on the learner's weights (training groups come from "
             "weights newer than their version tag)", "asymre/rollout/modes.py",
             "                self.sync.lend(self.last_pushed, self.pushed_version, lent)\n", "                pass\n",
             ("tests/rollout/test_modes.py::test_async_evaluation_between_pushes_lends_the_learners_weights_then_gives_the_behaviour_back",)),
    Mutation("the running baseline is not restored on resume", "recipes/train.py",
             '        self.learner.running.load_state_dict(state["running_baseline"])\n', "",
             ("tests/test_offpolicy_checkpoint.py",)),
    Mutation("the memory estimate keeps AdamW's state whole under ZeRO and FSDP (sharded recipes look too big)", "asymre/sizing.py",
             "optimizer = 8 * p / n[3]", "optimizer = 8 * p",
             ("tests/test_sizing.py::test_each_sharding_splits_its_parts_over_the_ranks",)),
    Mutation("the start-up memory warning never fires", "asymre/sizing.py", "if est.total > device_memory:",
             "if est.total > 10 * device_memory:", ("tests/test_sizing.py::test_warning_when_the_estimate_exceeds_the_gpu",)),
    Mutation("a remote server is sent the weight folder as given (a relative one resolves against the server's cwd)",
             "asymre/rollout/remote.py", "path = str(Path(weights).resolve())", "path = weights",
             ("tests/rollout/test_remote.py::test_weight_folder_goes_absolute_and_a_failed_cache_reset_is_an_error",)),
    Mutation("a remote server gets a round's requests one after another (it never batches them)", "asymre/rollout/remote.py",
             "max_workers=min(MAX_IN_FLIGHT, len(token_lists))", "max_workers=1",
             ("tests/rollout/test_remote.py::test_a_round_is_sent_at_once_so_the_server_can_batch_it",)),
    Mutation("a remote server's failed /reset_prefix_cache (success: false) is ignored", "asymre/rollout/remote.py",
             'if answer.get("success") is False:', "if False:",
             ("tests/rollout/test_remote.py::test_weight_folder_goes_absolute_and_a_failed_cache_reset_is_an_error",)),
    Mutation("any installed vLLM version passes the start-up check", "asymre/rollout/vllm_engine.py", "if installed is None or",
             "if True or", ("tests/rollout/test_from_config.py::test_a_vllm_outside_the_checked_versions_is_refused_at_start_up",
                            "tests/rollout/test_remote.py::test_a_server_running_an_unchecked_vllm_is_refused_naming_it")),
    Mutation("an NCCL weight channel keeps NCCL's blocking communicator init (unbounded when its peer never comes)", "asymre/sync.py",
             "    opts.config.blocking = 0\n", "    opts.config.blocking = 1\n",
             ("tests/test_sync.py::test_an_nccl_channel_is_built_to_raise_rather_than_tear_the_learner_down",)),
    Mutation("async evaluation gathers the learner's weights even right after a push", "asymre/rollout/modes.py",
             "state = self.weights() if self.pushed_version != learner_step else {}", "state = self.weights()",
             ("tests/rollout/test_modes.py::test_an_evaluation_right_after_a_push_gathers_no_weights",)),
    Mutation("a remote server is not asked whether it can receive streamed weights", "asymre/rollout/remote.py",
             "        if stream_weights:\n            self._check_receiver()", "        if False:\n            self._check_receiver()",
             ("tests/rollout/test_remote.py::test_streaming_weights_to_a_server_without_the_receiver_is_refused_at_start",)),
]


def apply(m: Mutation) -> tuple[Path, str]:
    """Write the mutation into its file; returns (file, original text) for the restore."""
    path = ROOT / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise LookupError(f"{m.path}: the line this mutation breaks ({m.old!r}) is not there exactly once: update tests/mutations.py")
    path.write_text(text.replace(m.old, m.new))
    return path, text


def run(m: Mutation) -> bool:
    """True when at least one of its tests fails with the mutation applied."""
    path, original = apply(m)
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests], cwd=ROOT,
                           capture_output=True, text=True)
        return r.returncode == 1  # 1: tests failed (not 2-5: an error collecting or running them)
    finally:
        path.write_text(original)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the table, run nothing")
    p.add_argument("--only", default="", help="only the mutations whose description or file contains this text")
    a = p.parse_args()
    survived = []
    for m in [m for m in MUTATIONS if a.only in m.what or a.only in m.path]:
        tier = "fast" if m.fast else "slow"
        if a.list:
            print(f"- {m.what} ({m.path}; {tier}): {', '.join(m.tests)}")
            continue
        caught = run(m)
        print(f"{'caught  ' if caught else 'SURVIVED'} [{tier}] {m.what}", flush=True)
        if not caught:
            survived.append(m.what)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
