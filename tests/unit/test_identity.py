"""The one device id rule (edge/identity.py) and every place that takes a device id refusing the same ids.

A device id is an MQTT user name, client id and topic level, a column of every sample file and the first
part of the names the ingest service stores uploads under; ``--`` in an id (or in an upload name) would let
device ``site`` write files read as ``site--a``'s.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from edge.config import load_config as load_serve_config
from edge.errors import ConfigError as EdgeConfigError
from edge.errors import SamplingError
from edge.identity import (
    DEVICE_ID_RULE,
    UPLOAD_NAME_RULE,
    is_device_id,
    is_upload_name,
    stored_upload_name,
    upload_owner,
)
from edge.sampling.sampler import Sampler, SampleStore
from edge.sampling.segments import file_name
from edge.updater.daemon import load_config as load_updater_config
from tasks.errors import ConfigError
from tasks.monitoring import ingest, simulate_drift
from tasks.rollout import fleet
from tasks.rollout.messages import DeviceId

GOOD_IDS = ["a", "cam-1", "site.a", "node_7", "A1-b2.c3_d4", "x" * 64, "sim-0042"]
BAD_IDS = ["", "site--a", "-cam", "cam-", ".cam", "cam.", "a..b", "a._b", "cam/1", "cam+1", "cam#", "cam 1",
           "x" * 65, "café", "cam\n", "\u0441am"]  # the last: a Cyrillic 'с'


@pytest.mark.parametrize("device", GOOD_IDS)
def test_good_ids(device):
    assert is_device_id(device)


@pytest.mark.parametrize("device", [*BAD_IDS, None, 7, b"cam"])
def test_bad_ids(device):
    assert not is_device_id(device)


def test_the_pydantic_type_names_the_rule_and_keeps_the_pattern_in_the_schema():
    class Record(BaseModel):
        device: DeviceId

    assert Record(device="cam-1").device == "cam-1"
    with pytest.raises(ValidationError, match="'site--a' is not allowed") as caught:
        Record(device="site--a")
    assert DEVICE_ID_RULE in str(caught.value)
    assert Record.model_json_schema()["properties"]["device"]["maxLength"] == 64


@pytest.mark.parametrize("name", ["0000000001-20261206T201530.123456Z-abcd1234.npz", "a.npz", "x-1.npz"])
def test_upload_names_the_edge_makes_are_allowed(name):
    assert is_upload_name(name)
    assert upload_owner(stored_upload_name("site", name)) == "site"


def test_the_edge_sample_store_names_files_by_the_upload_rule():
    assert is_upload_name(file_name(12, ".npz"))


@pytest.mark.parametrize("name", ["", ".npz", "a--b.npz", "../a.npz", "a/b.npz", "..npz", "a.npz.tmp", "a",
                                  ".hidden.npz", "a b.npz", "a" * 129 + ".npz", "a\\b.npz"])
def test_upload_names_that_could_escape_or_mislead_are_refused(name):
    assert not is_upload_name(name)
    with pytest.raises(ValueError, match="an upload name is"):
        stored_upload_name("site", name)


@pytest.mark.parametrize(("stored", "owner"), [
    ("site--a-1.npz", "site"), ("site--a--1.npz", None), ("site---1.npz", None), ("noprefix.npz", None),
    ("--a.npz", None), ("site--.npz", None), ("site--a.npz.reason.txt", None), ("x" * 65 + "--a.npz", None),
])
def test_a_stored_name_has_at_most_one_owner(stored, owner):
    assert upload_owner(stored) == owner


@pytest.mark.parametrize("device", BAD_IDS)
def test_every_entry_point_refuses_the_same_ids(tmp_path, device):
    """Enrolment (fleet file and broker credentials), ingest tokens, the edge service, the updater and the
    sampler: each refuses with the rule in its message and writes nothing."""
    with pytest.raises(ConfigError, match="1-64 letters and digits"):
        fleet.add_device(tmp_path / "fleet.yaml", tmp_path / "credentials", device, "north")
    with pytest.raises(ConfigError, match="1-64 letters and digits"):
        ingest.add_device(tmp_path / "tokens.json", device)
    assert not any(tmp_path.iterdir())
    with pytest.raises(EdgeConfigError, match="1-64 letters and digits"):
        load_serve_config(["--public-keys", str(tmp_path)], {"EDGELOOP_DEVICE_ID": device})
    with pytest.raises(EdgeConfigError, match="EDGELOOP_DEVICE_ID.*1-64 letters and digits"):
        load_updater_config(["--broker", "localhost", f"--device={device}", "--group", "lab", "--store",
                             str(tmp_path), "--public-keys", str(tmp_path)], {})
    with pytest.raises(SamplingError, match="1-64 letters and digits"):
        Sampler(SampleStore(tmp_path / "samples"), device)


def test_ingest_add_device_refuses_an_ambiguous_id_with_the_rule(tmp_path, capsys):
    assert ingest.main(["add-device", "site--a", "--tokens", str(tmp_path / "tokens.json")]) == 2
    assert DEVICE_ID_RULE in capsys.readouterr().err
    assert not (tmp_path / "tokens.json").exists()


def test_a_tokens_file_with_an_ambiguous_id_is_refused(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"site--a": "' + "0" * 64 + '"}')
    with pytest.raises(ConfigError, match="'site--a' is not allowed"):
        ingest.load_tokens(tokens)


def test_a_device_prefix_that_makes_bad_ids_is_refused():
    args = simulate_drift.build_parser().parse_args(["--device-prefix", "site-", "--devices", "2"])
    with pytest.raises(ConfigError, match="no two in a row"):
        simulate_drift._check(args)


def test_the_rules_are_stated_once():
    assert "'--'" in UPLOAD_NAME_RULE and "no two in a row" in DEVICE_ID_RULE
