import threading

from flows.locking import exclusive_outputs, lock_path
from flows.parameters import with_workspace
from tasks.config import Params


def test_second_run_on_the_same_outputs_waits_for_the_first(tmp_path):
    config = with_workspace(Params(), str(tmp_path))
    second_entered = threading.Event()

    def second_run():
        with exclusive_outputs(config):
            second_entered.set()

    with exclusive_outputs(config) as path:
        assert path == lock_path(config) and path.parent == tmp_path / "data"
        thread = threading.Thread(target=second_run)
        thread.start()
        assert not second_entered.wait(timeout=0.5)  # blocked while the first run holds the outputs
    assert second_entered.wait(timeout=10)
    thread.join(timeout=10)


def test_runs_in_different_workspaces_do_not_wait(tmp_path):
    first, second = with_workspace(Params(), str(tmp_path / "a")), with_workspace(Params(), str(tmp_path / "b"))
    with exclusive_outputs(first), exclusive_outputs(second):
        assert lock_path(first) != lock_path(second)
