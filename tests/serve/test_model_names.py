"""A request's `model` names the served model: it is compared with that name, never used as a
path. Names that look like paths (relative, absolute, escaping upwards, a symlink to another
model file, encoded) are unknown models (404), and serving them opens no file.
"""

from __future__ import annotations

import sys
import threading
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

from bitnet158.serve import Limits, create_app

_opened: list[str] | None = None  # file paths opened while a test records them
_lock = threading.Lock()


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event in ("open", "os.listdir", "os.scandir", "os.symlink"):
        with _lock:
            _opened.append(str(args[0]))


sys.addaudithook(_audit)  # a no-op unless a test records


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, limits=Limits(max_tokens=4, slots=2))
    with TestClient(app) as c:
        yield c


@pytest.fixture
def other_model(model_path, tmp_path):
    """Another model file, and a symlink to it, outside the served file's directory."""
    target = tmp_path / "other.safetensors"
    target.write_bytes(model_path.read_bytes())
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    return target, link


def path_like_names(model_path, other_model) -> list[str]:
    stem = model_path.stem
    target, link = other_model
    return [
        f"../{stem}",
        f"./{stem}",
        f"{stem}/../{stem}",
        f"../../{model_path.parent.name}/{stem}",
        model_path.name,
        str(model_path),
        str(model_path.with_suffix("")),
        str(target),
        str(target.with_suffix("")),
        str(link),
        "/etc/passwd",
        "~/" + stem,
        f"%2e%2e%2f{stem}",
        f"..\\{stem}",
        stem + "\x00",
        stem.upper(),
        f" {stem}",
    ]


def test_only_the_served_name_is_served(client, model_path):
    r = client.post(
        "/v1/completions", json={"model": model_path.stem, "prompt": "RO", "max_tokens": 2}
    )
    assert r.status_code == 200 and r.json()["model"] == model_path.stem


def test_path_like_model_names_are_unknown_and_open_nothing(client, model_path, other_model):
    global _opened
    names = path_like_names(model_path, other_model)
    _opened = []
    try:
        other_model[0].read_bytes()  # the recorder sees a file being opened...
        assert _opened == [str(other_model[0])]
        _opened.clear()  # ...and now records the requests
        for name in names:
            for route, body in [
                ("/v1/completions", {"model": name, "prompt": "RO", "max_tokens": 1}),
                ("/v1/chat/completions",
                 {"model": name, "messages": [{"role": "user", "content": "hi"}]}),
            ]:  # fmt: skip
                r = client.post(route, json=body)
                assert r.status_code == 404, (name, r.text)
                error = r.json()["error"]
                assert error["code"] == "model_not_found" and error["param"] == "model"
                assert repr(name) in error["message"] and model_path.stem in error["message"]
            r = client.get("/v1/models/" + quote(name, safe=""))  # as sent, not normalized
            assert r.status_code == 404, (name, r.text)
        opened = list(_opened)
    finally:
        _opened = None
    assert not [p for p in opened if any(part in p for part in ("other", "link", "passwd"))]
    assert not [p for p in opened if p.endswith(".safetensors")]


def test_the_model_list_names_one_model(client, model_path, other_model):
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [model_path.stem]
    assert client.get(f"/v1/models/{model_path.stem}").json()["id"] == model_path.stem
