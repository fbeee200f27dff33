"""`trainer.push_to_hub()` against a small loopback Hub (127.0.0.1 only), reached through `HF_ENDPOINT`.

The server implements the few endpoints that `create_repo` and `upload_folder` (its single-commit path, with xet
disabled) use: repository creation, README metadata validation, the pre-upload query (every file "regular", so
contents travel inline in the commit) and the commit itself (ndjson with base64 file contents). It keeps what
arrives in memory, answers only on 127.0.0.1, refuses large bodies and shuts itself down after a timeout.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset

from hf_hiso import FederatedZOCallback, HiSoTrainer
from hf_hiso.metrics import build_compute_metrics
from hf_hiso.model_card import CARD_INPUTS_NAME, HubUploadError, format_bytes

TOKEN = "hf_LoopbackTestToken_NeverWritten_42"
REPO = "tester/tiny-hiso-adapter"
MAX_BODY = 32 * 1024 * 1024
SERVER_LIFETIME_S = 120


@dataclass
class LoopbackHub:
    """What the loopback Hub received, and how it should answer."""

    url: str = ""
    fail: dict[str, int] = field(default_factory=dict)  # endpoint name -> HTTP status to answer instead
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, authorization header)
    repos: set[str] = field(default_factory=set)
    files: dict[str, bytes] = field(default_factory=dict)  # path in repo -> content of the last commit
    commits: int = 0


def endpoint_name(method: str, path: str) -> str:
    path = path.split("?", 1)[0]
    if method == "POST" and path == "/api/repos/create":
        return "create"
    if method == "POST" and path == "/api/validate-yaml":
        return "validate"
    if method == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
        return "preupload"
    if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
        return "commit"
    if method == "GET" and path.startswith("/api/models/"):
        return "info"
    return "unknown"


def make_handler(hub: LoopbackHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def _reply(self, status: int, payload: object | None = None) -> None:
            body = json.dumps(payload if payload is not None else {"error": f"status {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status >= 400:
                self.send_header("X-Error-Message", f"loopback hub answers {status}")
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise ValueError("body too large")
            return self.rfile.read(length)

        def _handle(self, method: str) -> None:
            name = endpoint_name(method, self.path)
            hub.requests.append((method, self.path, self.headers.get("Authorization", "")))
            body = self._body() if method == "POST" else b""
            if name in hub.fail:
                return self._reply(hub.fail[name])
            if name == "create":
                data = json.loads(body)
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                hub.repos.add(repo_id)
                return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
            if name == "validate":
                return self._reply(200, {"errors": [], "warnings": []})
            if name == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes, "commitOid": "0" * 40})
            if name == "commit":
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        assert value["encoding"] == "base64"
                        hub.files[value["path"]] = base64.b64decode(value["content"])
                hub.commits += 1
                oid = f"{hub.commits:040x}"
                return self._reply(200, {"commitUrl": f"{hub.url}/{REPO}/commit/{oid}", "commitOid": oid})
            return self._reply(404, {"error": f"loopback hub: no endpoint {method} {self.path}"})

        def do_GET(self):  # noqa: N802 (the http.server API)
            self._handle("GET")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

    return Handler


@pytest.fixture
def loopback_hub(monkeypatch) -> Iterator[LoopbackHub]:
    """A loopback Hub on 127.0.0.1 and an environment that sends huggingface_hub there (online, xet off)."""
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as transformers_hub

    hub = LoopbackHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopper = threading.Timer(SERVER_LIFETIME_S, server.shutdown)  # a hung test cannot leave it running
    stopper.daemon = True
    stopper.start()

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # huggingface_hub reads these once at import; transformers keeps one HfApi bound to the endpoint of its time.
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    try:
        yield hub
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add synchronisation on a shared machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_model():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=1, target_modules=["query", "value"])
    return get_peft_model(tiny_bert(), config)


def trained_trainer(tmp_path) -> HiSoTrainer:
    trainer = HiSoTrainer(
        model=lora_model(),
        args=hiso_args(tmp_path, hub_model_id=REPO, hub_token=TOKEN),
        train_dataset=toy_dataset(48),
        eval_dataset=toy_dataset(16, seed=1),
        compute_metrics=build_compute_metrics(None, num_labels=2, backend="scikit-learn"),
        callbacks=[FederatedZOCallback(num_clients=3, clients_per_round=2, seed=0)],
    )
    trainer.train()
    trainer.evaluate()
    return trainer


def logits(model, dataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(dataset["input_ids"]), attention_mask=torch.tensor(dataset["attention_mask"])
        ).logits


def test_push_uploads_adapter_and_card_that_load_back(loopback_hub, tmp_path, capfd, caplog):
    trainer = trained_trainer(tmp_path)
    with caplog.at_level("INFO"):
        trainer.push_to_hub(finetuned_from="org/tiny-bert", dataset_tags="toy-tokens")

    hub = loopback_hub
    assert REPO in hub.repos and hub.commits == 1
    # The token was used for the upload (and only there).
    auth = {a for method, path, a in hub.requests if endpoint_name(method, path) in ("create", "preupload", "commit")}
    assert auth == {f"Bearer {TOKEN}"}

    # What arrived: the adapter, the card and its inputs, and no checkpoint.
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", CARD_INPUTS_NAME):
        assert name in hub.files, sorted(hub.files)
    assert not any(path.startswith("checkpoint-") for path in hub.files)
    card = hub.files["README.md"].decode()
    ledger = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FederatedZOCallback)).ledger
    for figure in (
        ledger.bytes_uplink_total,
        ledger.bytes_downlink_total,
        ledger.bytes_total,
        ledger.fedavg_bytes_total,
    ):
        assert format_bytes(figure) in card
    assert f"{ledger.saving_factor:,.0f}x" in card
    assert "base_model: org/tiny-bert" in card and "federated-learning" in card
    assert card == (Path(trainer.args.output_dir) / "README.md").read_text()

    # No file that arrived, and no file written locally, holds the token; nor do the logs.
    for path, content in hub.files.items():
        assert TOKEN.encode() not in content, path
    for path in Path(trainer.args.output_dir).rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out + captured.err

    # The pushed adapter loads back and predicts exactly what the trained model predicts.
    arrived = tmp_path / "arrived"
    for path, content in hub.files.items():
        (arrived / path).parent.mkdir(parents=True, exist_ok=True)
        (arrived / path).write_bytes(content)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_bert(), arrived)
    data = toy_dataset(8, seed=3)
    torch.testing.assert_close(logits(reloaded, data), logits(trainer.model, data))
    assert not torch.allclose(logits(tiny_bert(), data), logits(trainer.model, data))


@pytest.mark.parametrize(("endpoint", "status"), [("commit", 500), ("create", 401)])
def test_failed_upload_is_a_clear_error_and_the_local_save_is_complete(loopback_hub, tmp_path, endpoint, status):
    loopback_hub.fail[endpoint] = status
    trainer = trained_trainer(tmp_path)
    out = Path(trainer.args.output_dir)
    with pytest.raises(HubUploadError, match=rf"(?s)Upload to the Hub failed: .*HTTP {status}.*saved locally") as err:
        trainer.push_to_hub()
    hint = "refused the token" if status == 401 else "server error"
    assert hint in str(err.value)
    assert TOKEN not in str(err.value)
    assert loopback_hub.commits == 0 and not loopback_hub.files
    # The local save is complete: the adapter, the card with the communication figures, its inputs.
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", CARD_INPUTS_NAME):
        assert (out / name).is_file(), name
    assert "### Communication" in (out / "README.md").read_text()
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_bert(), out)
    data = toy_dataset(8, seed=3)
    torch.testing.assert_close(logits(reloaded, data), logits(trainer.model, data))
