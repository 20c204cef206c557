"""launches.json (what the Rust launcher's plan is compared with) is what host.py launches now."""

import launches


def test_launches_json_is_current():
    with open(launches.OUT) as f:
        assert f.read() == launches.text(), "launches.json is stale: run launches.py"
