from __future__ import annotations

import requests


def test_live_server_serves_health_with_every_skill(live_server, catalog):
    response = requests.get(live_server.url + "/healthz", timeout=10)
    assert response.status_code == 200
    assert set(response.json()["models"]) == set(catalog.names)
