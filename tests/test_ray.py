"""The Ray engine on one simulated cluster (2 CPUs, 2 declared GPUs, token authentication on, as
``ray start`` runs where a token exists): the same files as a local run, nothing lost and nothing
twice when replicas crash, exit, hang or are killed, or when the driver is; no replica outlives its
run. The module runs in a home and a Ray temp folder of its own: the user's Ray state plays no part."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from florence_cli.cli import main

from .conftest import MAX_NEW_TOKENS, write_images
from .helpers import kill_mid_run, output_files, read_jsonl, wait_until

pytestmark = pytest.mark.ray

TASKS = ["OD", "CAPTION"]
BATCH = 3
TOKEN = "florence-test-token-" + "0" * 44  # the cluster's; Ray's own are 64 hex digits


# -- a replica that reports itself and fails on named files, for the tests --------------------------
def _probe_builder_class():
    from florence_cli.answer import AnswererBuilder

    @dataclass(frozen=True)
    class ProbeBuilder(AnswererBuilder):
        """Each replica writes {pid, CUDA_VISIBLE_DEVICES, node} to ``probe_dir``; a batch holding
        ``crash.png`` kills its process, one holding ``exit.png`` calls ``sys.exit(0)``, one holding
        ``hang.png`` blocks for good. With ``hold_after_crashes``, the first replica to start after
        that many crashes stops in its start for good, and a batch holding ``wait.png`` waits for it.
        Each crash, hang and hold leaves a file ``<what>-<pid>`` in ``probe_dir``."""

        probe_dir: str = ""
        hold_after_crashes: int = 0

        def __call__(self, device=None):
            import ray

            probes = Path(self.probe_dir)
            crashes = len(_marked(probes, "crash"))
            if self.hold_after_crashes and crashes >= self.hold_after_crashes and not _marked(probes, "hold"):
                _mark(probes, "hold")
                threading.Event().wait()
            answerer = super().__call__(device)
            record = {
                "pid": os.getpid(),
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "node": ray.get_runtime_context().get_node_id(),
            }
            Path(self.probe_dir, f"{os.getpid()}.json").write_text(json.dumps(record))
            answer = answerer.answer_safely

            def faulty(images):
                names = {Path(image.ref.path).name for image in images}
                if "crash.png" in names:
                    _mark(probes, "crash")
                    os._exit(1)
                if "exit.png" in names:
                    sys.exit(0)
                if "hang.png" in names:
                    _mark(probes, "hang")
                    threading.Event().wait()
                if "wait.png" in names:
                    wait_until(lambda: list(probes.glob("hold-*")))
                return answer(images)

            answerer.answer_safely = faulty
            return answerer

    return ProbeBuilder


def _mark(probes: Path, what: str) -> None:
    (probes / f"{what}-{os.getpid()}").touch()


def _marked(probes: Path, what: str) -> list[int]:
    return [int(p.name.rpartition("-")[2]) for p in probes.glob(f"{what}-*")]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- fixtures: one Ray cluster, one input folder, one local run to compare with ----------------------
@pytest.fixture(scope="module")
def ray_home():
    """A home holding the cluster's token and nothing else of Ray, a Ray temp folder (short: Ray's
    socket paths must fit), and no Ray settings from the user's environment."""
    with pytest.MonkeyPatch.context() as env, tempfile.TemporaryDirectory(prefix="ray-") as scratch:
        home = Path(scratch, "home")
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(TOKEN)
        env.setenv("HOME", str(home))
        env.setenv("RAY_TMPDIR", str(Path(scratch, "tmp")))
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            env.setenv(name, "")  # recorded first, so that what Ray sets later is undone too
            env.delenv(name)
        yield home


@pytest.fixture(scope="module")
def cluster(ray_home):
    """Nodes with token authentication: this process takes up the token in its home as
    ``--ray-address HOST:PORT`` does (Ray itself would not, for an explicit address), and the nodes it
    starts inherit the mode (``RAY_AUTH_MODE=token``), as ``ray start`` takes it up."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from florence_cli.ray_engine.cluster import _present_token_at_hand

    _present_token_at_hand()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    images = tmp_path_factory.mktemp("ray-inputs") / "imgs"
    write_images(images, 8)
    write_images(images / "sub", 4, start_seed=20, ext="jpg")
    (images / "junk.png").write_bytes(b"not an image")
    return images


@pytest.fixture(scope="module")
def local_runs(tiny_model, folder, tmp_path_factory):
    """The local run to compare with, at a batch size (answers' float scores depend on the batches)."""
    from florence_cli.annotate import Annotator, GenerationSettings, ModelConfig, RunConfig

    runs: dict[int, Path] = {}

    def run(batch_size: int) -> Path:
        if batch_size not in runs:
            out = tmp_path_factory.mktemp("local") / "out"
            generation = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
            config = RunConfig(ModelConfig(str(tiny_model), device="cpu"), batch_size=batch_size,
                               generation=generation)  # fmt: skip
            annotator = Annotator(config)
            annotator.run([str(folder)], out, TASKS, jsonl=str(out.parent / "answers.jsonl"))
            runs[batch_size] = out
        return runs[batch_size]

    return run


@pytest.fixture(scope="module")
def local_run(local_runs) -> Path:
    return local_runs(BATCH)


def _engine(tiny_model, probe_dir: Path, **options):
    from florence_cli.config import GenerationSettings, ModelConfig, RunConfig
    from florence_cli.ray_engine import RayEngine, RayOptions

    probe_dir.mkdir(exist_ok=True)
    generation = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    config = RunConfig(ModelConfig(str(tiny_model)), batch_size=BATCH, generation=generation)
    hold = options.pop("hold_after_crashes", 0)
    build = _probe_builder_class()(config, probe_dir=str(probe_dir), hold_after_crashes=hold)
    # no time limit but where one is the test: a loaded machine takes minutes to start a replica
    return RayEngine(config, RayOptions(**{"no_progress_timeout_s": -1, **options}), build=build)


def _run(engine, inputs: list[str], out, tasks: list[str], **options):
    """``runner.run`` with ``engine``, into ``out``, as the CLI runs it (``options``: ``RunConfig``'s)."""
    from florence_cli.jobs import parse_requests
    from florence_cli.runner import run

    config = replace(engine.config, output=Path(out), **options)
    return run(inputs, parse_requests(tasks), config, engine)


def _probes(probe_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(probe_dir.glob("*.json"))]


def _raw_answers(out: Path) -> dict[tuple[str, str], str]:
    """Each (image, task)'s generated text: the same whatever the batches."""
    return {(r["file"], r["task"]): r["raw"] for r in read_jsonl(out / ".florence" / "journal.jsonl")}


# -- the tests -------------------------------------------------------------------------------------
def test_same_files_as_local_one_replica_per_gpu(cluster, tiny_model, folder, local_run, tmp_path):
    out = tmp_path / "out"
    engine = _engine(tiny_model, tmp_path / "probes")
    summary = _run(engine, [str(folder)], out, TASKS, jsonl=str(tmp_path / "answers.jsonl"))
    assert (summary.annotated, summary.failed) == (12, 1)
    assert output_files(out) == output_files(local_run)
    assert (tmp_path / "answers.jsonl").read_bytes() == (local_run.parent / "answers.jsonl").read_bytes()
    assert read_jsonl(out / "errors.jsonl") == [{"file": "junk.png", "error": "not a readable image"}]
    assert sorted(p["cuda"] for p in _probes(tmp_path / "probes")) == ["0", "1"]


def test_a_killed_replica_loses_nothing_and_doubles_nothing(cluster, tiny_model, folder, local_run, tmp_path):
    engine = _engine(tiny_model, tmp_path / "probes")
    stream = engine.results

    killed = []

    def kill_after_first(items):
        for results in stream(items):
            if not killed:
                killed.append(_probes(tmp_path / "probes")[0]["pid"])
                os.kill(killed[0], signal.SIGKILL)
            yield results

    engine.results = kill_after_first
    out = tmp_path / "out"
    summary = _run(engine, [str(folder)], out, TASKS)
    assert (summary.annotated, summary.failed) == (12, 1)
    assert output_files(out) == output_files(local_run)
    journal = read_jsonl(out / ".florence" / "journal.jsonl")
    assert len(journal) == len({r["key"] for r in journal}) == 12 * len(TASKS)
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # it was a replica, and it is gone


def test_a_file_that_crashes_or_exits_the_worker_fails_alone(
    cluster, tiny_model, folder, local_run, tmp_path
):
    inputs = tmp_path / "imgs"
    shutil.copytree(folder, inputs)
    shutil.copy(folder / "img00.png", inputs / "crash.png")
    shutil.copy(folder / "img01.png", inputs / "exit.png")
    out = tmp_path / "out"
    summary = _run(_engine(tiny_model, tmp_path / "probes"), [str(inputs)], out, TASKS)
    assert (summary.annotated, summary.failed) == (12, 3)
    errors = {e["file"]: e["error"] for e in read_jsonl(out / "errors.jsonl")}
    assert errors["crash.png"] == "lost: worker crashed"
    assert errors["exit.png"].startswith("generation tried to end the worker")
    assert output_files(out).keys() == output_files(local_run).keys()  # new batches: float scores may differ
    assert _raw_answers(out) == _raw_answers(local_run)
    journaled = {r["file"] for r in read_jsonl(out / ".florence" / "journal.jsonl")}
    assert "crash.png" not in journaled and "exit.png" not in journaled  # a re-run retries them


def test_a_replica_restarting_when_its_pass_ends_does_not_outlive_it(cluster, tiny_model, folder, tmp_path):
    """Ray Data lets a pass's replicas go by dropping their handles; one that is restarting then comes
    back and keeps its GPU, and the next pass (or run) waits for a GPU that never comes."""
    inputs = tmp_path / "imgs"
    write_images(inputs, 2)  # [crash.png img00 img01] [wait.png]: the first batch crashes its replica
    shutil.copy(folder / "img00.png", inputs / "crash.png")  # twice; the replica's restart then stops,
    shutil.copy(folder / "img01.png", inputs / "wait.png")  # and the other batch waits for that
    probes = tmp_path / "probes"
    engine = _engine(tiny_model, probes, hold_after_crashes=2)
    summary = _run(engine, [str(inputs)], tmp_path / "out", TASKS)
    assert (summary.annotated, summary.failed) == (3, 1)
    assert len(_marked(probes, "crash")) == 4  # twice in its batch, twice alone: then it is guilty
    [held] = _marked(probes, "hold")
    assert wait_until(lambda: _gone(held)), "the replica restarting at the end of a pass is left running"


def test_a_hung_replica_ends_its_pass_and_is_gone(cluster, tiny_model, folder, tmp_path):
    """On a real cluster: the pass ends and the hung replica's process with it. (Which other images are
    answered depends on how long replicas take to start against the 3 s limit; the engine's bookkeeping
    is proven without a cluster below.)"""
    inputs = tmp_path / "imgs"
    write_images(inputs, 4)
    shutil.copy(folder / "img00.png", inputs / "hang.png")  # its replica never answers again
    probes = tmp_path / "probes"
    engine = _engine(tiny_model, probes, gpu_workers=1, no_progress_timeout_s=3)
    summary = _run(engine, [str(inputs)], tmp_path / "out", ["CAPTION"])
    assert summary.annotated + summary.failed == 5  # it ended, and every image is accounted for
    errors = {e["file"]: e["error"] for e in read_jsonl(tmp_path / "out" / "errors.jsonl")}
    assert errors["hang.png"] == "lost: no progress for 3 s"
    # a replica that hung (none, when replicas took longer than 3 s to start) is gone with its pass
    assert all(wait_until(lambda pid=pid: _gone(pid)) for pid in _marked(probes, "hang"))


def test_a_pass_that_times_out_retries_its_missing_images_alone_and_loses_only_the_guilty(monkeypatch):
    """The engine's passes with Ray Data stood in for (two replicas: a stalled batch holds one, the other
    answers the rest): the first pass stalls on the batch holding hang.png; the image-by-image pass
    answers the rest of that batch, and hang.png, stalling again, alone is lost."""
    pytest.importorskip("ray")
    from ray.data.exceptions import ExecutionTimeoutError

    from florence_cli.config import RunConfig
    from florence_cli.decode import ResizeSpec
    from florence_cli.jobs import WorkItem, parse_requests, plan_jobs
    from florence_cli.parse import parse_answer
    from florence_cli.ray_engine import Placement, RayEngine, RayOptions
    from florence_cli.ray_engine import engine as ray_engine
    from florence_cli.ray_engine.stages import AnsweredImage, pack_answered

    names = ["a.png", "b.png", "c.png", "d.png", "hang.png", "e.png", "f.png"]
    requests = parse_requests(["CAPTION"])
    work = []
    for name in names:
        ref = WorkItem(name, name, (name,))
        work.append(WorkItem(name, name, (name,), tuple(plan_jobs(ref, requests)[0])))
    passes = []

    def dataset(rows, placement, replicas):
        passes.append([list(row.idx) for row in rows])

        class Stalling:
            def iter_batches(self, **_):
                answer = parse_answer(requests[0].task, "</s><s>a cat</s>", 64, 48)
                for row in rows:
                    if "hang.png" not in (names[i] for i in row.idx):
                        yield pack_answered([AnsweredImage(i, 64, 48, [answer]) for i in row.idx])
                if any(names[i] == "hang.png" for row in rows for i in row.idx):
                    raise ExecutionTimeoutError("no progress")

        return Stalling()

    engine = RayEngine(RunConfig(batch_size=2), RayOptions(no_progress_timeout_s=3))
    engine.placement, engine.resize = Placement(2, 0, 1.0, 1, "cpu"), ResizeSpec(size=None)
    monkeypatch.setattr(engine, "_dataset", dataset)
    monkeypatch.setattr(ray_engine, "reserve", lambda placement, replicas: None)
    monkeypatch.setattr(ray_engine.ray.util, "remove_placement_group", lambda group: None)
    results = [result for batch in engine.results(work) for result in batch]
    assert passes == [[[0, 1], [2, 3], [4, 5], [6]], [[4], [5]]]
    assert [r.item.name for r in results] == names  # in submission order
    lost = {r.item.name: r.failure.reason for r in results if r.failure}
    assert lost == {"hang.png": "lost: no progress for 3 s"}


def _cli(model, folder, out, address):
    tasks = [arg for task in TASKS for arg in ("-t", task)]
    return [sys.executable, "-m", "florence_cli", "annotate", str(folder), *tasks, "-m", str(model),
            "-o", str(out), "-b", "1", "-q", "--max-new-tokens", str(MAX_NEW_TOKENS),
            "--engine", "ray", "--ray-address", address]  # fmt: skip


def _cli_env(**changes: str) -> dict[str, str]:
    """This process's environment less the token mode it joined with: the CLI finds the token itself."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}, **changes}


def test_driver_killed_then_resumed_gives_the_uninterrupted_output_files(
    cluster, tiny_model, folder, local_runs, tmp_path
):
    out = tmp_path / "out"
    command = _cli(tiny_model, folder, out, cluster.address)
    done_before = kill_mid_run(command, out / ".florence" / "journal.jsonl", 4, env=_cli_env())
    assert 0 < done_before < 12 * len(TASKS), "the kill must land mid-run"
    rerun = subprocess.run(command, capture_output=True, text=True, env=_cli_env())
    assert rerun.returncode == 1, rerun.stderr  # junk.png
    assert rerun.stderr.splitlines() == ["error: junk.png: not a readable image"]  # -q: Ray's C++ lines too
    assert output_files(out) == output_files(
        local_runs(1)
    )  # batches of one: a resumed run makes the same batches


@pytest.mark.parametrize("has_token", [True, False])
def test_a_token_the_cluster_refuses_or_misses_is_named(cluster, tiny_model, folder, tmp_path, has_token):
    # a wrong token in RAY_AUTH_TOKEN (which Ray reads before ~/.ray/auth_token), or a home without one
    setting = {"RAY_AUTH_TOKEN": "not-the-clusters-token"} if has_token else {"HOME": str(tmp_path)}
    env = _cli_env(RAY_NUM_REDIS_GET_RETRIES="1", **setting)  # Ray's retries cannot help a token
    command = _cli(tiny_model, folder, tmp_path / "out", cluster.address)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stderr
    cause = (
        "refused the auth token in RAY_AUTH_TOKEN"
        if has_token
        else "wants an auth token, and this machine has none"
    )
    assert f"{cause}: set RAY_AUTH_TOKEN" in result.stderr.strip().splitlines()[-1], result.stderr


def test_a_two_node_cluster_gives_the_same_output_files(cluster, tiny_model, folder, local_run, tmp_path):
    node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "out"
        _run(_engine(tiny_model, tmp_path / "probes", gpu_workers=3), [str(folder)], out, TASKS)
        assert output_files(out) == output_files(local_run)
        assert len({p["node"] for p in _probes(tmp_path / "probes")}) == 2
    finally:
        cluster.remove_node(node)


def test_placement_leaves_decoding_a_cpu():
    pytest.importorskip("ray")
    from florence_cli.ray_engine import Placement, RayEngineError, RayOptions, plan_placement

    gpu_node = {"CPU": 16, "GPU": 4}
    assert plan_placement([gpu_node], "auto", RayOptions()) == Placement(4, 1, 1.0, 12, "auto")
    assert plan_placement([{"CPU": 2, "GPU": 2}], "auto", RayOptions()) == Placement(2, 1, 0.5, 1, "auto")
    assert plan_placement([gpu_node], "auto", RayOptions(gpu_workers=2, decode_cpus=3)).replicas == 2
    assert plan_placement([{"CPU": 8}], "auto", RayOptions()) == Placement(1, 0, 7.0, 1, "cpu")
    assert plan_placement([gpu_node], "cpu", RayOptions(gpu_workers=2)) == Placement(2, 0, 7.0, 2, "cpu")
    for nodes, device, options, message in [
        ([gpu_node], "auto", RayOptions(gpu_workers=5), "has 4 GPUs"),
        ([{"CPU": 8}], "cuda", RayOptions(), "no GPUs"),
        ([gpu_node], "cuda:1", RayOptions(), "one GPU"),
        ([{"CPU": 2}], "auto", RayOptions(decode_cpus=2), "no CPU left"),
    ]:
        with pytest.raises(RayEngineError, match=message):
            plan_placement(nodes, device, options)


def test_reorder_keeps_submission_order_within_its_window():
    pytest.importorskip("ray")
    from florence_cli.ray_engine import Reorder

    order = Reorder(window=2)
    assert [order.add(i, i) for i in (1, 0, 2)] == [[], [0, 1], [2]]
    assert [order.add(i, i) for i in (4, 5, 6)] == [[], [], [4, 5, 6]]  # 3 is late: stop waiting
    assert order.add(3, 3) == [3] and order.add(7, 7) == [7]


def test_ray_flags_need_the_ray_engine(tmp_path, folder):
    for args, message in [
        (["--gpu-workers", "2"], "--gpu-workers needs --engine ray"),
        (["--engine", "ray", "--workers", "2"], "use --decode-cpus"),
        (["--shard", "3/3"], "0 <= I < N"),
    ]:
        result = CliRunner().invoke(main, ["annotate", str(folder), "-t", "OD", "-m", str(tmp_path), *args])
        assert result.exit_code == 2 and message in result.output, result.output


def test_engine_ray_without_ray_is_one_line_and_exit_2(tiny_model, folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    for module in [name for name in sys.modules if name.startswith("florence_cli.ray_engine")]:
        monkeypatch.delitem(sys.modules, module)
    result = CliRunner().invoke(
        main, ["annotate", str(folder), "-t", "OD", "-m", str(tiny_model), "--engine", "ray"]
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "pip install 'florence-cli[ray]'" in result.output


def test_the_local_engine_never_imports_ray(tiny_model, tmp_path):
    write_images(tmp_path / "one", 1)
    argv = ["annotate", str(tmp_path / "one"), "-t", "CAPTION", "-m", str(tiny_model),
            "-o", str(tmp_path / "o"), "--max-new-tokens", "4", "-q", "--workers", "0"]  # fmt: skip
    code = (
        f"import sys\nfrom florence_cli.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n"
    )
    code += "    print(e.code, 'ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["0", "False"], result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-t", "CAPTION_TO_PHRASE_GROUNDING", "--text", "car " * 1200], "the text input is too long"),
        (["-t", "OD", "--max-new-tokens", "5000"], "--max-new-tokens 5000 is more than this model generates"),
    ],
)
def test_engine_ray_refuses_what_the_model_cannot_hold_before_ray_starts(tiny_model, folder, tmp_path, args,
                                                                          message, monkeypatch):  # fmt: skip
    pytest.importorskip("ray")
    from florence_cli.ray_engine import cluster

    joined = []
    monkeypatch.setattr(cluster, "join", lambda address: joined.append(address) or False)
    out = tmp_path / "out"
    argv = ["annotate", str(folder), "-m", str(tiny_model), "-o", str(out), "--engine", "ray", *args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists() and joined == []  # refused before Ray was started or joined
