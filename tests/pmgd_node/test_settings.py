"""Service settings: environment, flag overrides, and a clear failure naming the variable."""

import dataclasses

import pytest

from pmgd_node.shell.process import NodeSettings
from pmgd_node.shell.settings import from_env, parse


def test_environment_then_flags():
    env = {"PMGD_HEARTBEAT_S": "0.25", "PMGD_CONTROL": "tcp://h:1", "PMGD_NODE_ID": "a"}
    s = from_env(NodeSettings, "PMGD_", env, node_id="b", resend_s=None)
    assert s == dataclasses.replace(NodeSettings(), heartbeat_s=0.25, control="tcp://h:1", node_id="b")
    assert parse(NodeSettings, "PMGD_", "x", "y", ["--resend-s", "2"]).resend_s == 2.0
    assert NodeSettings().with_node_id().node_id  # host-pid when none is given


def test_bad_value_names_the_variable():
    with pytest.raises(SystemExit, match="PMGD_HEARTBEAT_S must be of type float; got 'soon'"):
        from_env(NodeSettings, "PMGD_", {"PMGD_HEARTBEAT_S": "soon"})
