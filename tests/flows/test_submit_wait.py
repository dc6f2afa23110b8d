"""``quantvggt submit --wait`` follows the run to its end: one line with the final state, exit 1 when it failed."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness


@flow(name="wait-probe")
def _probe(fail: bool) -> str:
    if fail:
        raise RuntimeError("3 of 4 scenes failed (a, b, c); first error: SceneError: a: needs at least 2 usable images")
    return "ok"


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.parametrize(("fail", "code"), [(True, 1), (False, 0)])
def test_follow_reports_the_final_state_in_one_line(harness, fail: bool, code: int, capsys) -> None:
    from flows.commands import _follow

    state = _probe(fail, return_state=True)
    run_id = state.state_details.flow_run_id
    assert _follow(run_id, poll_s=0.1) == code
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith("flow run ") and (": Failed: RuntimeError: 3 of 4 scenes failed" in out) == fail, out
