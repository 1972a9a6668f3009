"""A failing tracking server: a real `mlflow server` behind a loopback proxy that answers /health but
fails the API with 500s, or answers slowly, when told to."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_tracking import fedcmi, get, project, start_server, stop  # noqa: F401 - project is a fixture

pytestmark = pytest.mark.slow


class Proxy:
    """Forwards to ``upstream``; ``fail_api`` makes every /api/ or /ajax-api/ call a 500, ``delay`` slows each."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_api = False
        self.delay = 0.0
        self.failed = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _forward(self) -> None:
                api = self.path.startswith(("/api/", "/ajax-api/"))
                if api and proxy.fail_api:
                    proxy.failed += 1
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if api and proxy.delay:
                    time.sleep(proxy.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                req = urllib.request.Request(proxy.upstream + self.path, data=body or None, method=self.command,
                                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, headers, data = resp.status, resp.headers, resp.read()
                except urllib.error.HTTPError as err:
                    status, headers, data = err.code, err.headers, err.read()
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def proxied(tmp_path_factory):
    proc, uri = start_server(tmp_path_factory.mktemp("server"))
    proxy = Proxy(uri)
    try:
        yield proxy, uri
    finally:
        proxy.close()
        stop(proc)


def test_an_api_that_fails_while_health_answers_stops_before_training(project, proxied):  # noqa: F811
    proxy, _ = proxied
    proxy.fail_api = True
    r = fedcmi("train", "--no-progress", cwd=project, uri=proxy.uri)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "answers, but opening a run failed" in r.stderr and "tracking.enabled=false" in r.stderr
    assert not (project / "outputs" / "train" / "checkpoints" / "state.json").exists()
    # bounded: tracking.max_retries (2) retries of the first call, not MLflow's default 7 with backoff 2
    assert proxy.failed <= 3 * (2 + 1)


def _train(project, uri, rounds=4, events=None, **tracking):  # noqa: F811
    from fedcmi.config import load_config
    from fedcmi.runners.engine import train
    from fedcmi.tracking.run import RUN_INFO, TrainingRun
    from fedcmi.tracking.sink import MlflowSink

    cwd = os.getcwd()
    os.chdir(project)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        cfg = load_config("params.yaml", [f"federation.rounds={rounds}",
                                          *(f"tracking.{k}={v}" for k, v in tracking.items())])
        tracker = TrainingRun.open(cfg, project / RUN_INFO, probe_every=0.0)
        sink = MlflowSink(tracker)

        class LogThen:
            def log_round(self, rec):
                sink.log_round(rec)
                (events or {}).get(rec.round, lambda: None)()

            def log_final(self, final, history):
                pass

        res = train(cfg, progress=False, sinks=[LogThen()])
        return res, tracker, tracker.close()
    finally:
        os.chdir(cwd)
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_500s_for_some_rounds_that_then_clear_are_all_replayed(project, proxied):  # noqa: F811
    proxy, upstream = proxied

    def fail(on: bool):
        def event():
            proxy.fail_api = on
        return event

    res, tracker, errors = _train(project, proxy.uri, events={1: fail(True), 3: fail(False)})
    assert errors == [] and tracker.unlogged == []
    assert tracker.replayed == ["round 2 metrics", "round 3 metrics"]
    hist = get(upstream, f"/api/2.0/mlflow/metrics/get-history?run_id={tracker.run_id}&metric_key=eval/mm_acc")
    assert sorted(m["step"] for m in hist["metrics"]) == [1, 2, 3, 4]
    assert get(upstream, f"/api/2.0/mlflow/runs/get?run_id={tracker.run_id}")["run"]["info"]["status"] == "FINISHED"


def test_an_outage_that_outlasts_training_is_waited_out_at_the_end_within_the_budget(project, proxied):  # noqa: F811
    """Round three, case 4: 500s right after round 1, for longer than the remaining rounds take. Before, the
    run ended with rounds 2-4 and the model 'not logged' (one flush attempt at close); now the end of the run
    waits (tracking.close_wait, within time_budget) and everything is replayed."""
    import threading

    proxy, upstream = proxied

    def outage():
        proxy.fail_api = True
        threading.Timer(20.0, lambda: setattr(proxy, "fail_api", False)).start()

    res, tracker, errors = _train(project, proxy.uri, events={1: outage}, close_wait=90)
    assert errors == [] and tracker.unlogged == []
    # what the outage held back was sent late (the rounds trained while it lasted: at least round 2)
    assert "round 2 metrics" in tracker.replayed
    hist = get(upstream, f"/api/2.0/mlflow/metrics/get-history?run_id={tracker.run_id}&metric_key=round/seconds")
    assert sorted(m["step"] for m in hist["metrics"]) == [1, 2, 3, 4]
    assert get(upstream, f"/api/2.0/mlflow/runs/get?run_id={tracker.run_id}")["run"]["info"]["status"] == "FINISHED"


def test_a_slow_server_costs_at_most_the_time_budget_with_one_warning(project, proxied, caplog):  # noqa: F811
    proxy, upstream = proxied

    def slow():
        proxy.delay = 1.5

    with caplog.at_level(logging.WARNING, logger="fedcmi"):
        res, tracker, errors = _train(project, proxy.uri, events={1: slow}, time_budget=2.0)
    assert [r.round for r in res.history] == [1, 2, 3, 4]  # training never waits past the budget
    assert tracker.out_of_time and tracker.spent < 2.0 + 2 * 1.5 + 2.0
    assert len(errors) == 1 and "tracking.time_budget (2 s) was spent; not logged: round" in errors[0]
    assert sum("time_budget" in r.message for r in caplog.records) == 1


def test_register_refuses_a_run_that_is_not_there_and_registers_nothing(project, proxied):  # noqa: F811
    _, uri = proxied
    assert fedcmi("train", "--no-progress", cwd=project, uri=uri).returncode == 0
    assert fedcmi("evaluate", "--out", "outputs/eval/metrics.json", cwd=project, uri=uri).returncode == 0
    info_file = project / "outputs" / "train" / "mlflow_run.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "run_id": "0" * 32}))
    r = fedcmi("register", cwd=project, uri=uri)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "is not on" in r.stderr, r.stderr[-2000:]
    assert "Successfully registered" not in r.stdout + r.stderr
    with pytest.raises(urllib.error.HTTPError):
        get(uri, "/api/2.0/mlflow/registered-models/get?name=tiny-model")


def test_a_registration_cut_short_is_finished_by_the_rerun_not_duplicated(project, proxied):  # noqa: F811
    """A kill after the version was created, before its aliases: the rerun finds the run's version."""
    _, uri = proxied
    assert fedcmi("train", "--no-progress", cwd=project, uri=uri).returncode == 0
    assert fedcmi("evaluate", "--out", "outputs/eval/metrics.json", cwd=project, uri=uri).returncode == 0
    first = json.loads(fedcmi("register", cwd=project, uri=uri).stdout)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for alias in ("candidate", "champion"):  # as if the process died before setting them
        client.delete_registered_model_alias("tiny-model", alias)
    second = json.loads(fedcmi("register", cwd=project, uri=uri).stdout)
    assert second["version"] == first["version"] == 1
    versions = client.search_model_versions("name = 'tiny-model'")
    assert [v.version for v in versions] == ["1"]
    assert client.get_model_version_by_alias("tiny-model", "champion").version == "1"
    assert {"mm_acc", "data_hash", "run_id"} <= set(versions[0].tags)

