import threading

from flows.locking import exclusive_outputs
from tasks.contracts import Workspace


def test_second_run_on_the_same_outputs_waits_for_the_first(tmp_path):
    workspace = Workspace(tmp_path)
    second_entered = threading.Event()

    def second_run():
        with exclusive_outputs(workspace):
            second_entered.set()

    with exclusive_outputs(workspace) as path:
        assert path == workspace.lock_file and path.parent == tmp_path
        thread = threading.Thread(target=second_run)
        thread.start()
        assert not second_entered.wait(timeout=0.5)  # blocked while the first run holds the outputs
    assert second_entered.wait(timeout=10)
    thread.join(timeout=10)


def test_runs_in_different_workspaces_do_not_wait(tmp_path):
    first, second = Workspace(tmp_path / "a"), Workspace(tmp_path / "b")
    with exclusive_outputs(first) as one, exclusive_outputs(second) as two:
        assert one != two
