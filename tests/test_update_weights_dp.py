"""WeightUpdateManager across --dp-size groups, without engines: a failure in one group makes
every group reload the served checkpoint, so the groups never serve different weights."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from nlcli.engine.api.update_weights import WeightUpdateManager
from nlcli.engine.args import ServerArgs
from nlcli.engine.io_struct import UpdateWeightReq, UpdateWeightReqOutput


class FakeEngines:
    """The TokenizerManager surface the update uses; answers each UpdateWeightReq with the
    next scripted (success, message) reply, as the merged answer of every group."""

    def __init__(self, dp_size: int, replies: list[tuple[bool, str]]):
        self.args = ServerArgs(model_path="/served", dp_size=dp_size)
        self.replies, self.sent, self.dead = list(replies), [], None
        self._handler = None

    def on_message(self, kind, handler):
        self._handler = handler

    def hold_new_requests(self):
        pass

    def release_held(self):
        pass

    def in_flight(self):
        return []

    def send(self, msg):
        assert isinstance(msg, UpdateWeightReq)
        self.sent.append(msg.model_path)
        ok, message = self.replies.pop(0)
        served = msg.model_path if ok else self.args.model_path
        reply = UpdateWeightReqOutput(ok, message, served, "auto")
        asyncio.get_running_loop().call_soon(self._handler, reply)


def _update(engines: FakeEngines):
    updated = []
    manager = WeightUpdateManager(engines, lambda path, fmt: updated.append(path))
    ok, message, _ = asyncio.run(manager.update("/new", None))
    return ok, message, updated


def test_a_failed_group_rolls_every_group_back():
    engines = FakeEngines(2, [(False, "DP group 1: bad shape"), (True, "ok")])
    ok, message, updated = _update(engines)
    assert not ok and updated == []
    assert engines.sent == ["/new", "/served"]  # the other group reloads what is served
    assert message == "DP group 1: bad shape Every DP group is back on /served."


def test_a_failed_rollback_is_reported():
    engines = FakeEngines(2, [(False, "DP group 0: no such file"), (False, "disk gone")])
    ok, message, _ = _update(engines)
    assert not ok and message.endswith("Rolling the other DP groups back failed too: disk gone")


def test_one_group_needs_no_rollback_and_success_needs_none():
    engines = FakeEngines(1, [(False, "bad shape")])
    assert _update(engines)[:2] == (False, "bad shape") and engines.sent == ["/new"]
    engines = FakeEngines(2, [(True, "Succeeded")])
    ok, _, updated = _update(engines)
    assert ok and updated == ["/new"] and engines.sent == ["/new"]
