"""tests/mutations.py stays current: every mutation it lists still finds the exact line it breaks, and names tests
that exist. (Running the mutations themselves: `.venv/bin/python -m tests.mutations`.)"""

import pytest

from tests.mutations import MUTATIONS, ROOT


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.what[:50] for m in MUTATIONS])
def test_each_mutation_still_finds_its_line_and_its_tests(m):
    assert (ROOT / m.path).read_text().count(m.old) == 1, f"{m.path}: update the mutation '{m.what}' in tests/mutations.py"
    for test in m.tests:
        file, _, name = test.partition("::")
        assert (ROOT / file).is_file(), test
        assert not name or f"def {name}(" in (ROOT / file).read_text(), test


def test_all_but_the_mid_run_reward_stop_are_caught_in_the_fast_tier():
    assert [m.what for m in MUTATIONS if not m.fast] == ["a reward error mid-run stops without checkpointing the last step"]
