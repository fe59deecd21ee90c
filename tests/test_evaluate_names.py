"""`perlhf eval` judge names: one per judge, never two judges under one name."""

import pytest

from perlhf.config import ConfigError
from perlhf.evaluate import judge_names


def test_judges_with_the_same_directory_name_get_the_shortest_distinct_paths():
    assert judge_names(["runs/a/best", "runs/b/best", "gold", "rm-small"]) == [
        "judge:a/best", "judge:b/best", "gold", "judge:rm-small"]
    assert judge_names(["x/a/best", "y/a/best", "z/best/"]) == ["judge:x/a/best", "judge:y/a/best", "judge:z/best"]


def test_a_judge_path_that_ends_another_keeps_its_whole_path():
    names = judge_names(["best", "a/best", "/abs/a/best"])
    assert names == ["judge:best", "judge:a/best", "judge:abs/a/best"]


@pytest.mark.parametrize("specs, repeated", [(["a/best", "./a/best/"], "a/best"), (["gold", "x", "gold"], "gold")])
def test_a_judge_given_twice_is_an_error_naming_it(specs, repeated):
    with pytest.raises(ConfigError, match=f"--judges: {repeated} is given twice"):
        judge_names(specs)
