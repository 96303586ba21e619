"""Hub export against a local stand-in of the Hub's HTTP API, the tokenizer conversion, and the
hope-export CLI's error handling (issue 7)."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from train.export import main as export_main
from train.hub import HubError, push_folder

ROOT = Path(__file__).resolve().parent.parent


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of huggingface.co's API for create_repo / create_branch / create_commit.

    Every request lands in `calls`; commits are decoded into their file operations. Uploads are
    answered as "regular" (inline base64 in the commit), so no LFS or Xet storage is needed.
    """

    calls: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, payload: dict, status: int = 200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = {"method": "POST", "path": self.path, "auth": self.headers.get("Authorization")}
        if "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            self.calls.append(record)
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                          for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            record["commit"] = [(line["key"], line["value"].get("path") or line["value"].get("summary"),
                                 base64.b64decode(line["value"]["content"]) if "content" in line["value"] else None)
                                for line in lines]
            self.calls.append(record)
            return self._reply({"commitUrl": f"http://{self.headers['Host']}/org/name/commit/abc", "commitOid": "abc" * 13 + "a",
                                "pullRequestUrl": None})
        if raw:
            record["json"] = json.loads(raw)
        self.calls.append(record)
        return self._reply({"url": f"http://{self.headers['Host']}/org/name", "name": "org/name"})

    def do_GET(self):
        self.calls.append({"method": "GET", "path": self.path})
        self._reply({"id": "org/name", "sha": "abc" * 13 + "a", "siblings": []})


@pytest.fixture()
def fake_hub():
    FakeHub.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.calls
    server.shutdown()


@pytest.fixture()
def folder(tmp_path) -> Path:
    """An exported folder's file layout, plus things that must never be uploaded."""
    out = tmp_path / "hf"
    out.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text(json.dumps({"name": name}))
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "modeling_hope.py").write_text("# code\n")
    (out / "README.md").write_text("# card\n")
    (out / "optimizer_portable.pt").write_bytes(b"optimizer state")
    (out / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"shards")
    (out / ".hidden.tmp-1").write_text("partial")
    return out


def test_push_commits_exactly_the_model_files_to_the_branch(fake_hub, folder):
    endpoint, calls = fake_hub
    url = push_folder(folder, "org/name", revision="step-00000100", private=True, token="hf_test", endpoint=endpoint)
    assert url == f"{endpoint}/org/name/commit/abc"
    create = next(c for c in calls if c["path"] == "/api/repos/create")
    assert create["json"]["name"] == "name" and create["json"]["organization"] == "org" and create["json"].get("visibility", create["json"].get("private")) in ("private", True)
    assert any(c["path"].startswith("/api/models/org/name/branch/step-00000100") for c in calls)
    commit = next(c for c in calls if "/commit/" in c["path"])
    assert commit["path"].startswith("/api/models/org/name/commit/step-00000100")
    assert commit["auth"] == "Bearer hf_test"
    files = {path: content for key, path, content in commit["commit"] if key == "file"}
    assert sorted(files) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                             "modeling_hope.py", "tokenizer.json", "tokenizer_config.json"]
    assert files["model.safetensors"] == b"weights"


def test_missing_token_is_one_clear_line(folder, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "empty-home" / "token"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # a developer's own login cache
    with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        push_folder(folder, "org/name")


def test_unreachable_hub_is_one_clear_line(folder):
    with pytest.raises(HubError, match=r"cannot reach the Hub at http://127.0.0.1:9") as error:
        push_folder(folder, "org/name", token="hf_test", endpoint="http://127.0.0.1:9")
    assert "\n" not in str(error.value)


def test_hub_rejects_bad_repo_name_and_non_export_folder(folder, tmp_path):
    with pytest.raises(HubError, match="expected ORG/NAME"):
        push_folder(folder, "just-a-name", token="t")
    with pytest.raises(HubError, match="no config.json"):
        push_folder(tmp_path, "org/name", token="t")


def test_cli_bad_checkpoint_exits_2_with_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere" in err and "checkpoints/latest" in err
    assert not (tmp_path / "out").exists()


def test_tokenizer_round_trip_matches_sentencepiece(tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from data_pipeline.tokenizer import train_sentencepiece
    from train.hf_tokenizer import hf_tokenizer

    source = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    model_path = train_sentencepiece(source * 3, tmp_path / "sp.model", vocab_size=600, threads=1)
    hf_tokenizer(model_path, 2, 3, 0).save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 3, 0)
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    texts = source[:2] + ["x  =  1   # two  spaces\n\tand tabs 12345 héllo 日本 🙂", "    indented\n        more  "]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text)
        assert tokenizer.decode(ids) == text


def test_run_config_export_keys_are_validated():
    from train.config import ConfigError, load_config

    config = load_config(ROOT / "configs/train/tiny-cpu.yaml", ["train.hf_export_every=120", "train.hf_push_to_hub=org/name"])
    assert (config.train.hf_export_every, config.train.hf_export_dtype, config.train.hf_push_to_hub) == (120, "bf16", "org/name")
    with pytest.raises(ConfigError, match="train.hf_export_dtype.*one of bf16, fp32.*fp16"):
        load_config(ROOT / "configs/train/tiny-cpu.yaml", ["train.hf_export_dtype=fp16"])
    with pytest.raises(ConfigError, match="train.hf_export_every"):
        load_config(ROOT / "configs/train/tiny-cpu.yaml", ["train.hf_export_every=-1"])
    with pytest.raises(ConfigError, match=r"train.hf_export_every: expected 0 or a multiple of train.checkpoint_every=60, got 50"):
        load_config(ROOT / "configs/train/tiny-cpu.yaml", ["train.hf_export_every=50"])  # exports convert checkpoints


def test_cli_exports_then_fails_push_without_token_in_one_line(tmp_path, monkeypatch, capsys):
    import torch
    import yaml

    from hope import HopeConfig, HopeForCausalLM

    config = HopeConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, mixer="attention",
                        cms_hidden_sizes=[32], cms_periods=[0]).validate()
    step_dir = tmp_path / "run" / "checkpoints" / "step-00000003"
    step_dir.mkdir(parents=True)
    torch.save({"module": HopeForCausalLM(config).state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    (step_dir / "model_config.json").write_text(json.dumps(config.to_dict()))
    (step_dir / "config.yaml").write_text(yaml.safe_dump({"data": {"path": str(tmp_path / "no-shards")}}))
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": 3, "tokens_seen": 96}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000003")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    code = export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--push-to-hub", "org/name"])
    out, err = capsys.readouterr()
    assert code == 2 and "exported" in out
    assert "warning: no tokenizer exported" in err  # the run's shards are gone: said, not fatal
    assert err.strip().splitlines()[-1] == "hope-export: no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    assert (tmp_path / "out" / "model.safetensors").is_file()
